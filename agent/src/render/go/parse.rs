//! Go text/template syntax: splitting text from actions (with custom delimiters and `{{-`/`-}}`
//! trimming), tokenizing actions, and building the tree. Unknown functions are parse errors that
//! name the function, as in Go.

use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Text(String),
    Action(Pipe),
    If {
        pipe: Pipe,
        then: Vec<Node>,
        otherwise: Vec<Node>,
    },
    Range {
        pipe: Pipe,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
    With {
        pipe: Pipe,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
    Template {
        name: String,
        pipe: Option<Pipe>,
    },
    Break,
    Continue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pipe {
    pub decl: Vec<String>,
    /// `=` rather than `:=`.
    pub assign: bool,
    pub cmds: Vec<Cmd>,
    pub pos: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cmd {
    pub args: Vec<Arg>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// `.` followed by zero or more field names.
    Field(Vec<String>),
    /// `$name` followed by field names.
    Var(String, Vec<String>),
    /// A function name.
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Nil,
    /// `( pipeline )` followed by field names.
    Sub(Box<Pipe>, Vec<String>),
}

/// A parsed template and the `define`d ones it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    pub root: Vec<Node>,
    pub defines: HashMap<String, Vec<Node>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Text(String),
    /// The action's inner text and its byte offset in the template (for line numbers).
    Action(String, usize),
}

/// Line number (1-based) of a byte offset.
pub fn line_of(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())].matches('\n').count() + 1
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Splits the template into text and actions, applying trim markers.
fn split(text: &str, left: &str, right: &str) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    let mut rest = 0;
    let mut trim_next = false;
    while let Some(found) = text[rest..].find(left) {
        let start = rest + found;
        let mut literal = text[rest..start].to_string();
        if trim_next {
            literal = literal.trim_start_matches(is_space).to_string();
        }
        let mut inner_start = start + left.len();
        // "{{- " trims the text before; the dash must be followed by a space.
        let trim_left =
            text[inner_start..].starts_with('-') && text[inner_start + 1..].starts_with(is_space);
        if trim_left {
            literal = literal.trim_end_matches(is_space).to_string();
            inner_start += 1;
        }
        if !literal.is_empty() {
            items.push(Item::Text(literal));
        }
        let end = find_close(text, inner_start, right).ok_or_else(|| {
            format!(
                "line {}: unclosed action (no {right:?})",
                line_of(text, start)
            )
        })?;
        let mut inner_end = end;
        let trim_right = text[..end].ends_with('-')
            && end >= inner_start + 2
            && text[..end - 1].ends_with(is_space);
        if trim_right {
            inner_end -= 1;
        }
        items.push(Item::Action(
            text[inner_start..inner_end].to_string(),
            start,
        ));
        rest = end + right.len();
        trim_next = trim_right;
    }
    let mut tail = text[rest..].to_string();
    if trim_next {
        tail = tail.trim_start_matches(is_space).to_string();
    }
    if !tail.is_empty() {
        items.push(Item::Text(tail));
    }
    Ok(items)
}

/// The position of the closing delimiter, skipping quoted strings, raw strings and comments.
fn find_close(text: &str, from: usize, right: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = from;
    let trimmed = text[from..].trim_start_matches(is_space);
    if trimmed.starts_with("/*") {
        let open = from + (text[from..].len() - trimmed.len());
        let close = text[open + 2..].find("*/")? + open + 2 + 2;
        return text[close..].find(right).map(|p| close + p);
    }
    while i < text.len() {
        if text[i..].starts_with(right) {
            return Some(i);
        }
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < text.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    if bytes[i] == b'\n' {
                        return None;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < text.len() && bytes[i] != b'`' {
                    i += 1;
                }
            }
            b'\'' => {
                i += 1;
                while i < text.len() && bytes[i] != b'\'' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Field(Vec<String>),
    Var(String, Vec<String>),
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Char(i64),
    Pipe,
    Open,
    /// `)` and the field names chained after it.
    Close(Vec<String>),
    Declare,
    Assign,
    Comma,
}

fn field_chain(chars: &[char], i: &mut usize) -> Vec<String> {
    let mut fields = Vec::new();
    while *i < chars.len() && chars[*i] == '.' {
        let start = *i + 1;
        let mut j = start;
        while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
            j += 1;
        }
        if j == start {
            break;
        }
        fields.push(chars[start..j].iter().collect());
        *i = j;
    }
    fields
}

fn unquote(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some('a') => out.push('\u{7}'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some('0'..='7') => return Err("octal escapes are not supported".into()),
            Some(k @ ('x' | 'u' | 'U')) => {
                let n = match k {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let hex: String = (0..n).filter_map(|_| chars.next()).collect();
                let code =
                    u32::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\{k}{hex}"))?;
                out.push(char::from_u32(code).ok_or_else(|| format!("bad escape \\{k}{hex}"))?);
            }
            other => {
                return Err(format!(
                    "unknown escape \\{}",
                    other.map(String::from).unwrap_or_default()
                ));
            }
        }
    }
    Ok(out)
}

fn tokenize(action: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = action.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if is_space(c) => i += 1,
            '|' => {
                toks.push(Tok::Pipe);
                i += 1;
            }
            '(' => {
                toks.push(Tok::Open);
                i += 1;
            }
            ')' => {
                i += 1;
                toks.push(Tok::Close(field_chain(&chars, &mut i)));
            }
            ',' => {
                toks.push(Tok::Comma);
                i += 1;
            }
            ':' if chars.get(i + 1) == Some(&'=') => {
                toks.push(Tok::Declare);
                i += 2;
            }
            '=' => {
                toks.push(Tok::Assign);
                i += 1;
            }
            '"' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && chars[j] != '"' {
                    if chars[j] == '\\' {
                        j += 1;
                    }
                    j += 1;
                }
                if j >= chars.len() {
                    return Err("unterminated quoted string".into());
                }
                let raw: String = chars[start..j].iter().collect();
                toks.push(Tok::Str(unquote(&raw)?));
                i = j + 1;
            }
            '`' => {
                let start = i + 1;
                let j = chars[start..]
                    .iter()
                    .position(|c| *c == '`')
                    .ok_or("unterminated raw quoted string")?
                    + start;
                toks.push(Tok::Str(chars[start..j].iter().collect()));
                i = j + 1;
            }
            '\'' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && chars[j] != '\'' {
                    if chars[j] == '\\' {
                        j += 1;
                    }
                    j += 1;
                }
                let raw: String = chars[start..j.min(chars.len())].iter().collect();
                let text = unquote(&raw)?;
                let ch = text.chars().next().ok_or("empty character constant")?;
                toks.push(Tok::Char(ch as i64));
                i = j + 1;
            }
            '.' if chars.get(i + 1).is_none_or(|c| !c.is_ascii_digit()) => {
                let mut j = i;
                let fields = field_chain(&chars, &mut j);
                if j == i {
                    j = i + 1; // a lone dot
                }
                toks.push(Tok::Field(fields));
                i = j;
            }
            '$' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[start..j].iter().collect();
                let fields = field_chain(&chars, &mut j);
                toks.push(Tok::Var(format!("${name}"), fields));
                i = j;
            }
            c if c.is_ascii_digit()
                || ((c == '-' || c == '+' || c == '.')
                    && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                let mut j = i + 1;
                while j < chars.len()
                    && (chars[j].is_ascii_alphanumeric()
                        || chars[j] == '.'
                        || chars[j] == '_'
                        || ((chars[j] == '-' || chars[j] == '+')
                            && matches!(chars[j - 1], 'e' | 'E' | 'p' | 'P')))
                {
                    j += 1;
                }
                let lit: String = chars[start..j].iter().filter(|c| **c != '_').collect();
                toks.push(number(&lit)?);
                i = j;
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                let mut j = i;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                toks.push(Tok::Ident(chars[start..j].iter().collect()));
                i = j;
            }
            other => return Err(format!("unexpected {other:?} in action")),
        }
    }
    Ok(toks)
}

fn number(lit: &str) -> Result<Tok, String> {
    let (neg, body) = match lit.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, lit.strip_prefix('+').unwrap_or(lit)),
    };
    let int = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if let Some(b) = body.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()
    } else if let Some(o) = body.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()
    } else {
        body.parse::<i64>().ok()
    };
    if let Some(n) = int {
        return Ok(Tok::Int(if neg { -n } else { n }));
    }
    lit.parse::<f64>()
        .map(Tok::Float)
        .map_err(|_| format!("bad number syntax: {lit:?}"))
}

struct Parser<'a> {
    items: Vec<Item>,
    at: usize,
    funcs: &'a dyn Fn(&str) -> bool,
    defines: HashMap<String, Vec<Node>>,
    source: &'a str,
}

/// What ended a list of nodes.
enum Stop {
    Eof,
    End,
    Else(Vec<Tok>),
}

const KEYWORDS: [&str; 10] = [
    "if", "else", "end", "range", "with", "define", "template", "block", "break", "continue",
];

pub fn parse(
    text: &str,
    left: &str,
    right: &str,
    funcs: &dyn Fn(&str) -> bool,
) -> Result<Tree, String> {
    let items = split(text, left, right)?;
    let mut p = Parser {
        items,
        at: 0,
        funcs,
        defines: HashMap::new(),
        source: text,
    };
    let (root, end) = p.list(0)?;
    match end {
        Stop::Eof => Ok(Tree {
            root,
            defines: p.defines,
        }),
        Stop::End => Err("unexpected {{end}}".into()),
        Stop::Else(_) => Err("unexpected {{else}}".into()),
    }
}

impl Parser<'_> {
    fn err(&self, pos: usize, msg: impl std::fmt::Display) -> String {
        format!("line {}: {msg}", line_of(self.source, pos))
    }

    fn list(&mut self, depth: usize) -> Result<(Vec<Node>, Stop), String> {
        let mut nodes = Vec::new();
        while self.at < self.items.len() {
            let item = self.items[self.at].clone();
            self.at += 1;
            let (action, pos) = match item {
                Item::Text(t) => {
                    nodes.push(Node::Text(t));
                    continue;
                }
                Item::Action(a, pos) => (a, pos),
            };
            let trimmed = action.trim();
            if trimmed.starts_with("/*") {
                if !trimmed.ends_with("*/") {
                    return Err(self.err(pos, "unclosed comment"));
                }
                continue;
            }
            let toks = tokenize(&action).map_err(|e| self.err(pos, e))?;
            let keyword = match toks.first() {
                Some(Tok::Ident(k)) if KEYWORDS.contains(&k.as_str()) => k.clone(),
                None => return Err(self.err(pos, "missing value for command")),
                _ => {
                    nodes.push(Node::Action(self.pipe(&toks, pos, false)?));
                    continue;
                }
            };
            let rest = &toks[1..];
            match keyword.as_str() {
                "end" => {
                    if depth == 0 {
                        return Err(self.err(pos, "unexpected {{end}}"));
                    }
                    return Ok((nodes, Stop::End));
                }
                "else" => {
                    if depth == 0 {
                        return Err(self.err(pos, "unexpected {{else}}"));
                    }
                    return Ok((nodes, Stop::Else(rest.to_vec())));
                }
                "if" | "range" | "with" => nodes.push(self.control(&keyword, rest, pos, depth)?),
                "break" => nodes.push(Node::Break),
                "continue" => nodes.push(Node::Continue),
                "template" => {
                    let Some(Tok::Str(name)) = rest.first() else {
                        return Err(self.err(pos, "template needs a quoted name"));
                    };
                    let pipe = if rest.len() > 1 {
                        Some(self.pipe(&rest[1..], pos, false)?)
                    } else {
                        None
                    };
                    nodes.push(Node::Template {
                        name: name.clone(),
                        pipe,
                    });
                }
                "define" | "block" => {
                    let Some(Tok::Str(name)) = rest.first() else {
                        return Err(self.err(pos, format!("{keyword} needs a quoted name")));
                    };
                    let (body, end) = self.list(depth + 1)?;
                    if !matches!(end, Stop::End) {
                        return Err(self.err(pos, format!("unterminated {keyword}")));
                    }
                    self.defines.insert(name.clone(), body);
                    if keyword == "block" {
                        let pipe = if rest.len() > 1 {
                            Some(self.pipe(&rest[1..], pos, false)?)
                        } else {
                            None
                        };
                        nodes.push(Node::Template {
                            name: name.clone(),
                            pipe,
                        });
                    }
                }
                _ => unreachable!("keywords are listed"),
            }
        }
        Ok((nodes, Stop::Eof))
    }

    fn control(
        &mut self,
        keyword: &str,
        toks: &[Tok],
        pos: usize,
        depth: usize,
    ) -> Result<Node, String> {
        let pipe = self.pipe(toks, pos, keyword == "range")?;
        let (body, end) = self.list(depth + 1)?;
        let otherwise = match end {
            Stop::Eof => {
                return Err(self.err(
                    pos,
                    format!("unexpected EOF: {{{{{keyword}}}}} has no {{{{end}}}}"),
                ));
            }
            Stop::End => Vec::new(),
            Stop::Else(else_toks) if else_toks.is_empty() => {
                let (otherwise, end) = self.list(depth + 1)?;
                if !matches!(end, Stop::End) {
                    return Err(self.err(
                        pos,
                        format!("{{{{{keyword}}}}} has no {{{{end}}}} after {{{{else}}}}"),
                    ));
                }
                otherwise
            }
            // `else if` / `else with`: a nested control that shares this one's end.
            Stop::Else(else_toks) => match else_toks.first() {
                Some(Tok::Ident(k)) if k == "if" || k == "with" => {
                    vec![self.control(k, &else_toks[1..], pos, depth)?]
                }
                _ => return Err(self.err(pos, "unexpected tokens after else")),
            },
        };
        Ok(match keyword {
            "if" => Node::If {
                pipe,
                then: body,
                otherwise,
            },
            "range" => Node::Range {
                pipe,
                body,
                otherwise,
            },
            _ => Node::With {
                pipe,
                body,
                otherwise,
            },
        })
    }

    /// A pipeline, with an optional variable declaration.
    fn pipe(&self, toks: &[Tok], pos: usize, range: bool) -> Result<Pipe, String> {
        let mut decl = Vec::new();
        let mut assign = false;
        let mut rest = toks;
        // `$x :=`, `$x =`, or in range `$k, $v :=`.
        let decl_end = toks
            .iter()
            .position(|t| matches!(t, Tok::Declare | Tok::Assign));
        if let Some(end) = decl_end {
            let vars = &toks[..end];
            let all_vars = vars.iter().enumerate().all(|(i, t)| {
                if i % 2 == 0 {
                    matches!(t, Tok::Var(_, f) if f.is_empty())
                } else {
                    matches!(t, Tok::Comma)
                }
            });
            if all_vars && !vars.is_empty() {
                for t in vars.iter().step_by(2) {
                    if let Tok::Var(name, _) = t {
                        decl.push(name.clone());
                    }
                }
                if decl.len() > 2 || (decl.len() == 2 && !range) {
                    return Err(self.err(pos, "too many declarations"));
                }
                assign = matches!(toks[end], Tok::Assign);
                rest = &toks[end + 1..];
            }
        }
        let mut cmds = Vec::new();
        let mut i = 0;
        while i <= rest.len() {
            let (cmd, next) = self.command(rest, i, pos)?;
            cmds.push(cmd);
            i = next;
            if i < rest.len() && rest[i] == Tok::Pipe {
                i += 1;
                continue;
            }
            break;
        }
        if i < rest.len() {
            return Err(self.err(pos, format!("unexpected {:?} in command", rest[i])));
        }
        Ok(Pipe {
            decl,
            assign,
            cmds,
            pos,
        })
    }

    fn command(&self, toks: &[Tok], mut i: usize, pos: usize) -> Result<(Cmd, usize), String> {
        let mut args = Vec::new();
        while i < toks.len() {
            let arg = match &toks[i] {
                Tok::Pipe | Tok::Close(_) => break,
                Tok::Field(f) => Arg::Field(f.clone()),
                Tok::Var(n, f) => Arg::Var(n.clone(), f.clone()),
                Tok::Str(s) => Arg::Str(s.clone()),
                Tok::Int(n) | Tok::Char(n) => Arg::Int(*n),
                Tok::Float(f) => Arg::Float(*f),
                Tok::Ident(id) => match id.as_str() {
                    "true" => Arg::Bool(true),
                    "false" => Arg::Bool(false),
                    "nil" => Arg::Nil,
                    name if (self.funcs)(name) => Arg::Ident(name.to_string()),
                    name => return Err(self.err(pos, format!("function {name:?} not defined"))),
                },
                Tok::Open => {
                    // Find the matching close.
                    let mut depth = 0;
                    let mut j = i;
                    loop {
                        match toks.get(j) {
                            Some(Tok::Open) => depth += 1,
                            Some(Tok::Close(_)) => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            Some(_) => {}
                            None => return Err(self.err(pos, "unclosed left paren")),
                        }
                        j += 1;
                    }
                    let inner = self.pipe(&toks[i + 1..j], pos, false)?;
                    let Tok::Close(fields) = &toks[j] else {
                        unreachable!()
                    };
                    i = j;
                    Arg::Sub(Box::new(inner), fields.clone())
                }
                Tok::Declare | Tok::Assign | Tok::Comma => {
                    return Err(self.err(pos, "unexpected declaration"));
                }
            };
            args.push(arg);
            i += 1;
        }
        if args.is_empty() {
            return Err(self.err(pos, "missing value for command"));
        }
        Ok((Cmd { args }, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &str) -> bool {
        true
    }

    #[test]
    fn trimming_and_comments() {
        let items = split("a  {{- .x -}}  b {{/* c */}} d", "{{", "}}").unwrap();
        assert_eq!(
            items,
            vec![
                Item::Text("a".into()),
                Item::Action(" .x ".into(), 3),
                Item::Text("b ".into()),
                Item::Action("/* c */".into(), 17),
                Item::Text(" d".into())
            ]
        );
        // "{{-3}}" is the number -3, not a trim marker.
        let items = split("x {{-3}}", "{{", "}}").unwrap();
        assert_eq!(items[1], Item::Action("-3".into(), 2));
        assert!(
            split("{{ .x ", "{{", "}}")
                .unwrap_err()
                .contains("unclosed action")
        );
        assert_eq!(
            split("[[ .x ]]{{ raw }}", "[[", "]]").unwrap()[1],
            Item::Text("{{ raw }}".into())
        );
        // A closing delimiter inside a string does not close the action.
        assert_eq!(
            split(r#"{{ "}}" }}"#, "{{", "}}").unwrap(),
            vec![Item::Action(r#" "}}" "#.into(), 0)]
        );
    }

    #[test]
    fn tokens() {
        assert_eq!(
            tokenize(
                r#"$k, $v := .Data.data | printf "%s\n" `raw\n` 1.5 -2 0x1F 'a' (index .x 0).Name"#
            )
            .unwrap(),
            vec![
                Tok::Var("$k".into(), vec![]),
                Tok::Comma,
                Tok::Var("$v".into(), vec![]),
                Tok::Declare,
                Tok::Field(vec!["Data".into(), "data".into()]),
                Tok::Pipe,
                Tok::Ident("printf".into()),
                Tok::Str("%s\n".into()),
                Tok::Str("raw\\n".into()),
                Tok::Float(1.5),
                Tok::Int(-2),
                Tok::Int(31),
                Tok::Char(97),
                Tok::Open,
                Tok::Ident("index".into()),
                Tok::Field(vec!["x".into()]),
                Tok::Int(0),
                Tok::Close(vec!["Name".into()]),
            ]
        );
        assert_eq!(tokenize(".").unwrap(), vec![Tok::Field(vec![])]);
    }

    #[test]
    fn structure_and_errors() {
        let t = parse(
            "{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}",
            "{{",
            "}}",
            &any,
        )
        .unwrap();
        let Node::If { otherwise, .. } = &t.root[0] else {
            panic!()
        };
        assert!(matches!(otherwise[0], Node::If { .. }));
        assert!(
            parse("{{ if .a }}", "{{", "}}", &any)
                .unwrap_err()
                .contains("no {{end}}")
        );
        assert!(
            parse("{{ end }}", "{{", "}}", &any)
                .unwrap_err()
                .contains("unexpected {{end}}")
        );
        let known = |f: &str| f == "secret";
        assert_eq!(
            parse("x\n{{ nope 1 }}", "{{", "}}", &known).unwrap_err(),
            "line 2: function \"nope\" not defined"
        );
        assert!(parse("{{ .x | }}", "{{", "}}", &any).is_err());
        let t = parse(
            "{{ define \"t\" }}T{{ end }}{{ template \"t\" . }}",
            "{{",
            "}}",
            &any,
        )
        .unwrap();
        assert!(t.defines.contains_key("t"));
    }
}
