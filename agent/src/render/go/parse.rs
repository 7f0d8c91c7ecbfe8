//! Go text/template syntax: splitting text from actions (with custom delimiters and `{{-`/`-}}`
//! trimming), tokenizing actions with Go's lexical rules (Unicode letters and digits in names,
//! only ASCII space as space), and building the tree. What Go's parser refuses is refused here
//! too, with Go's wording where it has one: unknown functions, undefined variables, `break`
//! outside `range`, a template defined twice. Nesting and size are bounded (see `limits`).

use std::collections::HashMap;
use std::sync::Arc;

use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

use crate::render::limits::{self, Limit, MAX_NESTING};

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

/// A parsed template and the `define`d ones it carries (shared, so a call does not copy them).
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    pub root: Vec<Node>,
    pub defines: HashMap<String, Arc<Vec<Node>>>,
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: {problem}")]
    Syntax { line: usize, problem: String },
    #[error(transparent)]
    Limit(#[from] Limit),
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Text(String),
    /// The action's inner text and its byte offset in the template (for line numbers).
    Action(String, usize),
}

/// Line number (1-based) of a byte offset.
pub fn line_of(text: &str, pos: usize) -> usize {
    let end = pos.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn syntax(text: &str, pos: usize, problem: impl Into<String>) -> ParseError {
    ParseError::Syntax {
        line: line_of(text, pos),
        problem: problem.into(),
    }
}

/// Go's `isSpace`: only these four are space inside an action (a no-break space is not).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Go's `unicode.IsLetter`: general category L.
fn is_letter(c: char) -> bool {
    c.is_ascii_alphabetic()
        || (!c.is_ascii() && c.general_category_group() == GeneralCategoryGroup::Letter)
}

/// Go's `isAlphaNumeric`: `_`, `unicode.IsLetter` or `unicode.IsDigit` (general category Nd).
fn is_alnum(c: char) -> bool {
    c == '_'
        || c.is_ascii_digit()
        || is_letter(c)
        || (!c.is_ascii() && c.general_category() == GeneralCategory::DecimalNumber)
}

/// Go's `%#U`: `U+1F511 '🔑'`, the character itself only when Go's `strconv.IsPrint` holds.
fn go_rune(c: char) -> String {
    let printable = c == ' '
        || matches!(
            c.general_category_group(),
            GeneralCategoryGroup::Letter
                | GeneralCategoryGroup::Mark
                | GeneralCategoryGroup::Number
                | GeneralCategoryGroup::Punctuation
                | GeneralCategoryGroup::Symbol
        );
    if printable {
        format!("U+{:04X} '{c}'", c as u32)
    } else {
        format!("U+{:04X}", c as u32)
    }
}

/// Splits the template into text and actions, applying trim markers. Delimiters are matched as
/// bytes; a match always starts and ends on a character boundary, since a delimiter is whole
/// characters.
fn split(text: &str, left: &str, right: &str) -> Result<Vec<Item>, ParseError> {
    let mut items = Vec::new();
    let mut rest = 0;
    let mut trim_next = false;
    while let Some(found) = text[rest..].find(left) {
        let start = rest + found;
        let mut literal = &text[rest..start];
        if trim_next {
            literal = literal.trim_start_matches(is_space);
        }
        let mut inner_start = start + left.len();
        // "{{- " trims the text before; the dash must be followed by a space.
        let after = &text.as_bytes()[inner_start..];
        let trim_left =
            after.first() == Some(&b'-') && after.get(1).is_some_and(|b| is_space(char::from(*b)));
        if trim_left {
            literal = literal.trim_end_matches(is_space);
            inner_start += 1;
        }
        if !literal.is_empty() {
            items.push(Item::Text(literal.to_string()));
        }
        let end = find_close(text, inner_start, right)
            .ok_or_else(|| syntax(text, start, format!("unclosed action (no {right:?})")))?;
        // " -}}" trims the text after; the dash must follow a space.
        let inner = &text.as_bytes()[inner_start..end];
        let trim_right = inner.len() >= 2
            && inner[inner.len() - 1] == b'-'
            && is_space(char::from(inner[inner.len() - 2]));
        let inner_end = if trim_right { end - 1 } else { end };
        check_comment(
            text,
            start,
            &text[inner_start..inner_end],
            trim_left,
            trim_right,
        )?;
        items.push(Item::Action(
            text[inner_start..inner_end].to_string(),
            start,
        ));
        rest = end + right.len();
        trim_next = trim_right;
    }
    let mut tail = &text[rest..];
    if trim_next {
        tail = tail.trim_start_matches(is_space);
    }
    if !tail.is_empty() {
        items.push(Item::Text(tail.to_string()));
    }
    Ok(items)
}

/// Go's placement rules for a comment: `/*` right after the delimiter (or after `- `), and `*/`
/// right before it (or before ` -`); `{{ /* c */ }}` is not a comment but a bad command.
fn check_comment(
    text: &str,
    at: usize,
    raw: &str,
    trim_left: bool,
    trim_right: bool,
) -> Result<(), ParseError> {
    let body = raw.trim_start_matches(is_space);
    if !body.starts_with("/*") {
        return Ok(());
    }
    let lead = raw.len() - body.len();
    if lead != usize::from(trim_left) {
        return Err(syntax(text, at, "unexpected \"/\" in command"));
    }
    let body = raw.trim_end_matches(is_space);
    let trail = raw.len() - body.len();
    if body.len() >= 4 && body.ends_with("*/") && trail != usize::from(trim_right) {
        return Err(syntax(text, at, "comment ends before closing delimiter"));
    }
    Ok(())
}

/// The position of the closing delimiter, skipping quoted strings, raw strings and comments.
/// Works on bytes: quotes and backslashes are ASCII, and a delimiter match is a boundary.
fn find_close(text: &str, from: usize, right: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let trimmed = text[from..].trim_start_matches(is_space);
    if trimmed.starts_with("/*") {
        let open = from + (text[from..].len() - trimmed.len());
        let close = text[open + 2..].find("*/")? + open + 2 + 2;
        return text[close..].find(right).map(|p| close + p);
    }
    let mut i = from;
    while i < bytes.len() {
        if bytes[i..].starts_with(right.as_bytes()) {
            return Some(i);
        }
        match bytes[i] {
            quote @ (b'"' | b'\'') => {
                i += 1;
                while i < bytes.len() && bytes[i] != quote {
                    if bytes[i] == b'\n' {
                        return None;
                    }
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'`' {
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

impl Tok {
    /// The token as a user wrote it, for errors.
    fn describe(&self) -> String {
        let chain = |fields: &[String]| fields.iter().map(|f| format!(".{f}")).collect::<String>();
        match self {
            Tok::Field(f) if f.is_empty() => "\".\"".into(),
            Tok::Field(f) => format!("{:?}", chain(f)),
            Tok::Var(n, f) => format!("{:?}", format!("{n}{}", chain(f))),
            Tok::Ident(n) => format!("{n:?}"),
            Tok::Str(s) => format!("{s:?}"),
            Tok::Int(n) | Tok::Char(n) => n.to_string(),
            Tok::Float(f) => f.to_string(),
            Tok::Pipe => "\"|\"".into(),
            Tok::Open => "\"(\"".into(),
            Tok::Close(_) => "\")\"".into(),
            Tok::Declare => "\":=\"".into(),
            Tok::Assign => "\"=\"".into(),
            Tok::Comma => "\",\"".into(),
        }
    }
}

/// Go's `atTerminator`: what may follow a name (the right delimiter is not in the action text).
fn at_terminator(chars: &[char], i: usize) -> bool {
    chars
        .get(i)
        .is_none_or(|c| is_space(*c) || matches!(c, '.' | ',' | '|' | ':' | ')' | '('))
}

/// The end of the name starting at `i`.
fn name_end(chars: &[char], i: usize) -> usize {
    let mut j = i;
    while j < chars.len() && is_alnum(chars[j]) {
        j += 1;
    }
    j
}

/// `.a.b.c` from `i`; `.5` is left for the number lexer, as in Go.
fn field_chain(chars: &[char], i: &mut usize) -> Vec<String> {
    let mut fields = Vec::new();
    while *i < chars.len() && chars[*i] == '.' {
        let start = *i + 1;
        if chars.get(start).is_some_and(char::is_ascii_digit) {
            break;
        }
        let j = name_end(chars, start);
        if j == start {
            break;
        }
        fields.push(chars[start..j].iter().collect());
        *i = j;
    }
    fields
}

/// A name must end at a terminator: `{{ .x🔑 }}` is Go's "bad character".
fn terminated(chars: &[char], j: usize) -> Result<(), String> {
    if at_terminator(chars, j) {
        Ok(())
    } else {
        Err(format!("bad character {}", go_rune(chars[j])))
    }
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
                let code = (hex.len() == n && hex.chars().all(|c| c.is_ascii_hexdigit()))
                    .then(|| u32::from_str_radix(&hex, 16).ok())
                    .flatten()
                    .ok_or_else(|| format!("bad escape \\{k}{hex}"))?;
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

/// The end (exclusive, at the closing quote) of a quoted run starting after `start`'s quote.
fn quoted_end(chars: &[char], start: usize, quote: char) -> Option<usize> {
    let mut j = start;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\n' {
            return None;
        }
        if chars[j] == '\\' {
            j += 1;
        }
        j += 1;
    }
    (j < chars.len()).then_some(j)
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
                let fields = field_chain(&chars, &mut i);
                if !fields.is_empty() {
                    terminated(&chars, i)?;
                }
                toks.push(Tok::Close(fields));
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
                let j = quoted_end(&chars, i + 1, '"').ok_or("unterminated quoted string")?;
                let raw: String = chars[i + 1..j].iter().collect();
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
                let j = quoted_end(&chars, i + 1, '\'').ok_or("unterminated character constant")?;
                let raw: String = chars[i + 1..j].iter().collect();
                let text = unquote(&raw)?;
                let mut it = text.chars();
                let (Some(ch), None) = (it.next(), it.next()) else {
                    return Err(format!("malformed character constant: '{raw}'"));
                };
                toks.push(Tok::Char(i64::from(u32::from(ch))));
                i = j + 1;
            }
            '.' if chars.get(i + 1).is_none_or(|c| !c.is_ascii_digit()) => {
                let mut j = i;
                let fields = field_chain(&chars, &mut j);
                if j == i {
                    j = i + 1; // a lone dot
                }
                terminated(&chars, j)?;
                toks.push(Tok::Field(fields));
                i = j;
            }
            '$' => {
                let j = name_end(&chars, i + 1);
                let name: String = chars[i + 1..j].iter().collect();
                let mut j = j;
                let fields = field_chain(&chars, &mut j);
                terminated(&chars, j)?;
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
                if j < chars.len() && is_alnum(chars[j]) {
                    let lit: String = chars[start..=j].iter().collect();
                    return Err(format!("bad number syntax: {lit:?}"));
                }
                let lit: String = chars[start..j].iter().filter(|c| **c != '_').collect();
                toks.push(number(&lit)?);
                i = j;
            }
            c if is_alnum(c) => {
                let mut j = name_end(&chars, i);
                // consul-template's `scratch.Get "k"`: a method of the scratch pad, one name here.
                if chars[i..j].iter().copied().eq("scratch".chars())
                    && chars.get(j) == Some(&'.')
                    && chars.get(j + 1).is_some_and(|c| is_alnum(*c))
                {
                    j = name_end(&chars, j + 1);
                }
                terminated(&chars, j)?;
                toks.push(Tok::Ident(chars[i..j].iter().collect()));
                i = j;
            }
            other => {
                return Err(format!(
                    "unrecognized character in action: {}",
                    go_rune(other)
                ));
            }
        }
    }
    Ok(toks)
}

fn number(lit: &str) -> Result<Tok, String> {
    let (neg, body) = match lit.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, lit.strip_prefix('+').unwrap_or(lit)),
    };
    let radix = |digits: &str, radix: u32| {
        // from_str_radix takes a sign of its own; a literal has had its sign removed already.
        (!digits.starts_with(['+', '-']))
            .then(|| i64::from_str_radix(digits, radix).ok())
            .flatten()
    };
    let int = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        if let Some((mantissa, exp)) = h.split_once(['p', 'P']) {
            return hex_float(mantissa, exp)
                .map(|f| Tok::Float(if neg { -f } else { f }))
                .ok_or_else(|| format!("bad number syntax: {lit:?}"));
        }
        radix(h, 16)
    } else if let Some(b) = body.strip_prefix("0b") {
        radix(b, 2)
    } else if let Some(o) = body.strip_prefix("0o") {
        radix(o, 8)
    } else if body.len() > 1 && body.starts_with('0') && body.bytes().all(|b| b.is_ascii_digit()) {
        // A leading zero is octal, as in Go (017 is 15, 09 is an error).
        return radix(&body[1..], 8)
            .map(|n| Tok::Int(if neg { -n } else { n }))
            .ok_or_else(|| format!("bad number syntax: {lit:?}"));
    } else {
        // The whole literal, sign included, so that the most negative integer parses.
        return lit
            .parse::<i64>()
            .map(Tok::Int)
            .or_else(|_| lit.parse::<f64>().map(Tok::Float))
            .map_err(|_| format!("bad number syntax: {lit:?}"));
    };
    if let Some(n) = int {
        return Ok(Tok::Int(if neg { -n } else { n }));
    }
    lit.parse::<f64>()
        .map(Tok::Float)
        .map_err(|_| format!("bad number syntax: {lit:?}"))
}

/// A hexadecimal float's value (`0x1.8p4` is 24): hex digits with an optional point, and a
/// binary exponent.
fn hex_float(mantissa: &str, exp: &str) -> Option<f64> {
    let exp: i32 = exp.parse().ok()?;
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    let mut value = 0f64;
    for c in whole.chars() {
        value = value * 16.0 + f64::from(c.to_digit(16)?);
    }
    let mut scale = 1.0 / 16.0;
    for c in frac.chars() {
        value += f64::from(c.to_digit(16)?) * scale;
        scale /= 16.0;
    }
    Some(value * 2f64.powi(exp))
}

struct Parser<'a> {
    items: Vec<Item>,
    at: usize,
    /// Whether a function exists: Err holds the problem to report (not defined, or one that
    /// Vault Agent has and Sidekey does not).
    funcs: &'a dyn Fn(&str) -> Result<(), String>,
    defines: HashMap<String, Arc<Vec<Node>>>,
    source: &'a str,
    /// Blocks and parentheses open around the current position.
    depth: usize,
    /// `range` bodies open around the current position (`break`/`continue` need one).
    ranges: usize,
    /// The variables in scope, `$` first.
    vars: Vec<String>,
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

/// Parses a template. Empty delimiters mean the default ones, as in Go's `Delims`.
pub fn parse(
    text: &str,
    left: &str,
    right: &str,
    funcs: &dyn Fn(&str) -> Result<(), String>,
) -> Result<Tree, ParseError> {
    limits::check_size(text)?;
    let left = if left.is_empty() { "{{" } else { left };
    let right = if right.is_empty() { "}}" } else { right };
    let items = split(text, left, right)?;
    let mut p = Parser {
        items,
        at: 0,
        funcs,
        defines: HashMap::new(),
        source: text,
        depth: 0,
        ranges: 0,
        vars: vec!["$".into()],
    };
    let (root, end) = p.list()?;
    match end {
        Stop::Eof => Ok(Tree {
            root,
            defines: p.defines,
        }),
        Stop::End => Err(syntax(text, text.len(), "unexpected {{end}}")),
        Stop::Else(_) => Err(syntax(text, text.len(), "unexpected {{else}}")),
    }
}

/// Go's `IsEmptyTree`: only space and comments, so a later definition may replace it.
fn is_empty_body(nodes: &[Node]) -> bool {
    nodes
        .iter()
        .all(|n| matches!(n, Node::Text(t) if t.trim().is_empty()))
}

impl Parser<'_> {
    fn err(&self, pos: usize, msg: impl std::fmt::Display) -> ParseError {
        syntax(self.source, pos, msg.to_string())
    }

    /// One level deeper (a block or a parenthesis), within `MAX_NESTING`.
    fn enter(&mut self, pos: usize) -> Result<(), ParseError> {
        if self.depth >= MAX_NESTING {
            return Err(Limit::Nesting {
                limit: MAX_NESTING,
                line: line_of(self.source, pos),
            }
            .into());
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// A keyword that takes nothing after it (`end`, `else`, `break`, `continue`).
    fn bare(&self, keyword: &str, rest: &[Tok], pos: usize) -> Result<(), ParseError> {
        match rest.first() {
            None => Ok(()),
            Some(t) => Err(self.err(
                pos,
                format!("unexpected {} in {{{{{keyword}}}}}", t.describe()),
            )),
        }
    }

    fn list(&mut self) -> Result<(Vec<Node>, Stop), ParseError> {
        let mut nodes = Vec::new();
        while self.at < self.items.len() {
            let item = std::mem::replace(&mut self.items[self.at], Item::Text(String::new()));
            self.at += 1;
            let (action, pos) = match item {
                Item::Text(t) => {
                    nodes.push(Node::Text(t));
                    continue;
                }
                Item::Action(a, pos) => (a, pos),
            };
            let trimmed = action.trim_matches(is_space);
            if trimmed.starts_with("/*") {
                if !trimmed.ends_with("*/") || trimmed.len() < 4 {
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
                    if self.depth == 0 {
                        return Err(self.err(pos, "unexpected {{end}}"));
                    }
                    self.bare("end", rest, pos)?;
                    return Ok((nodes, Stop::End));
                }
                "else" => {
                    if self.depth == 0 {
                        return Err(self.err(pos, "unexpected {{else}}"));
                    }
                    return Ok((nodes, Stop::Else(rest.to_vec())));
                }
                "if" | "range" | "with" => nodes.push(self.control(&keyword, rest, pos)?),
                "break" | "continue" => {
                    self.bare(&keyword, rest, pos)?;
                    if self.ranges == 0 {
                        return Err(
                            self.err(pos, format!("{{{{{keyword}}}}} outside {{{{range}}}}"))
                        );
                    }
                    nodes.push(if keyword == "break" {
                        Node::Break
                    } else {
                        Node::Continue
                    });
                }
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
                    if let Some(node) = self.definition(&keyword, rest, pos)? {
                        nodes.push(node);
                    }
                }
                _ => return Err(self.err(pos, format!("unexpected {{{{{keyword}}}}}"))),
            }
        }
        Ok((nodes, Stop::Eof))
    }

    /// `define` (top level only, as in Go) or `block` (a define and a call of it).
    fn definition(
        &mut self,
        keyword: &str,
        rest: &[Tok],
        pos: usize,
    ) -> Result<Option<Node>, ParseError> {
        let Some(Tok::Str(name)) = rest.first() else {
            return Err(self.err(pos, format!("{keyword} needs a quoted name")));
        };
        // Inside a block (a `block` body included) there is no define, as in Go.
        if keyword == "define" && self.depth > 0 {
            return Err(self.err(
                pos,
                "{{define}} is allowed only at the top level, not inside another block",
            ));
        }
        if keyword == "define" && rest.len() > 1 {
            return Err(self.err(
                pos,
                format!("unexpected {} in define clause", rest[1].describe()),
            ));
        }
        // A block's pipeline is evaluated where the block stands, with the variables there.
        let pipe = if keyword == "block" && rest.len() > 1 {
            Some(self.pipe(&rest[1..], pos, false)?)
        } else {
            None
        };
        self.enter(pos)?;
        // A definition sees only `$`, and no enclosing range.
        let vars = std::mem::replace(&mut self.vars, vec!["$".into()]);
        let ranges = std::mem::replace(&mut self.ranges, 0);
        let body = self.list();
        self.vars = vars;
        self.ranges = ranges;
        self.leave();
        let (body, end) = body?;
        if !matches!(end, Stop::End) {
            return Err(self.err(pos, format!("unterminated {keyword}")));
        }
        match self.defines.get(name) {
            Some(old) if !is_empty_body(old) && !is_empty_body(&body) => {
                return Err(self.err(
                    pos,
                    format!("template: multiple definition of template {name:?}"),
                ));
            }
            Some(old) if is_empty_body(&body) && !is_empty_body(old) => {}
            _ => {
                self.defines.insert(name.clone(), Arc::new(body));
            }
        }
        Ok((keyword == "block").then(|| Node::Template {
            name: name.clone(),
            pipe,
        }))
    }

    fn control(&mut self, keyword: &str, toks: &[Tok], pos: usize) -> Result<Node, ParseError> {
        self.enter(pos)?;
        let scope = self.vars.len();
        let node = self.control_inner(keyword, toks, pos);
        self.vars.truncate(scope);
        self.leave();
        node
    }

    fn control_inner(
        &mut self,
        keyword: &str,
        toks: &[Tok],
        pos: usize,
    ) -> Result<Node, ParseError> {
        let range = keyword == "range";
        let pipe = self.pipe(toks, pos, range)?;
        self.ranges += usize::from(range);
        let body = self.list();
        self.ranges -= usize::from(range);
        let (body, end) = body?;
        let otherwise = match end {
            Stop::Eof => {
                return Err(self.err(
                    pos,
                    format!("unexpected EOF: {{{{{keyword}}}}} has no {{{{end}}}}"),
                ));
            }
            Stop::End => Vec::new(),
            Stop::Else(else_toks) => match else_toks.first() {
                None => {
                    let (otherwise, end) = self.list()?;
                    if !matches!(end, Stop::End) {
                        return Err(self.err(
                            pos,
                            format!("{{{{{keyword}}}}} has no {{{{end}}}} after {{{{else}}}}"),
                        ));
                    }
                    otherwise
                }
                // `else if` in an if, `else with` in a with: a nested control that shares
                // this one's end (as in Go, only these two).
                Some(Tok::Ident(k)) if k == keyword && (k == "if" || k == "with") => {
                    vec![self.control(k, &else_toks[1..], pos)?]
                }
                Some(t) => {
                    return Err(self.err(
                        pos,
                        format!(
                            "unexpected {} after {{{{else}}}} in {{{{{keyword}}}}}",
                            t.describe()
                        ),
                    ));
                }
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
    fn pipe(&mut self, toks: &[Tok], pos: usize, range: bool) -> Result<Pipe, ParseError> {
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
                // As in Go, a declared name is in scope from here (and so is an assigned one;
                // assigning to an undeclared variable fails when it runs).
                self.vars.extend(decl.iter().cloned());
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
                // Go takes a pipe that ends in `|` as if the `|` were not there.
                if i == rest.len() {
                    break;
                }
                continue;
            }
            break;
        }
        if i < rest.len() {
            return Err(self.err(pos, format!("unexpected {} in command", rest[i].describe())));
        }
        Ok(Pipe {
            decl,
            assign,
            cmds,
            pos,
        })
    }

    fn command(
        &mut self,
        toks: &[Tok],
        mut i: usize,
        pos: usize,
    ) -> Result<(Cmd, usize), ParseError> {
        let mut args = Vec::new();
        while i < toks.len() {
            let arg = match &toks[i] {
                Tok::Pipe | Tok::Close(_) => break,
                Tok::Field(f) => Arg::Field(f.clone()),
                Tok::Var(n, f) => {
                    if !self.vars.contains(n) {
                        return Err(self.err(pos, format!("undefined variable {n:?}")));
                    }
                    Arg::Var(n.clone(), f.clone())
                }
                Tok::Str(s) => Arg::Str(s.clone()),
                Tok::Int(n) | Tok::Char(n) => Arg::Int(*n),
                Tok::Float(f) => Arg::Float(*f),
                Tok::Ident(id) => match id.as_str() {
                    "true" => Arg::Bool(true),
                    "false" => Arg::Bool(false),
                    "nil" => Arg::Nil,
                    name if KEYWORDS.contains(&name) => {
                        return Err(self.err(pos, format!("unexpected {{{{{name}}}}} in operand")));
                    }
                    name => match (self.funcs)(name) {
                        Ok(()) => Arg::Ident(name.to_string()),
                        Err(problem) => return Err(self.err(pos, problem)),
                    },
                },
                Tok::Open => {
                    let (j, fields) = matching_close(toks, i)
                        .ok_or_else(|| self.err(pos, "unclosed left paren"))?;
                    self.enter(pos)?;
                    let inner = self.pipe(&toks[i + 1..j], pos, false);
                    self.leave();
                    i = j;
                    Arg::Sub(Box::new(inner?), fields)
                }
                Tok::Declare | Tok::Assign | Tok::Comma => {
                    return Err(
                        self.err(pos, format!("unexpected {} in operand", toks[i].describe()))
                    );
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

/// The index of the `)` that closes the `(` at `open`, and the fields chained after it.
fn matching_close(toks: &[Tok], open: usize) -> Option<(usize, Vec<String>)> {
    let mut depth = 0usize;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Open => depth += 1,
            Tok::Close(fields) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some((j, fields.clone()));
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn go(text: &str) -> Result<Tree, ParseError> {
        parse(text, "{{", "}}", &any)
    }

    fn problem(text: &str) -> String {
        go(text).unwrap_err().to_string()
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
                .to_string()
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
        let t = go("{{ if .a }}A{{ else if .b }}B{{ else }}C{{ end }}").unwrap();
        let Node::If { otherwise, .. } = &t.root[0] else {
            panic!("an if node: {:?}", t.root)
        };
        assert!(matches!(otherwise[0], Node::If { .. }));
        assert!(problem("{{ if .a }}").contains("no {{end}}"));
        assert!(problem("{{ end }}").contains("unexpected {{end}}"));
        let known = |f: &str| match f {
            "secret" => Ok(()),
            other => Err(format!("function {other:?} not defined")),
        };
        assert_eq!(
            parse("x\n{{ nope 1 }}", "{{", "}}", &known).unwrap_err(),
            ParseError::Syntax {
                line: 2,
                problem: "function \"nope\" not defined".into()
            }
        );
        // Go takes a trailing `|` as if it were not there.
        assert!(go("{{ .x | }}").is_ok());
        let t = go("{{ define \"t\" }}T{{ end }}{{ template \"t\" . }}").unwrap();
        assert!(t.defines.contains_key("t"));
    }

    /// `depth` levels of `open … close` around `inner`.
    fn nested(open: &str, inner: &str, close: &str, depth: usize) -> String {
        format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
    }

    #[test]
    fn nesting_is_bounded_for_every_construct() {
        let deep = [
            nested("{{ if .Data }}", "x", "{{ end }}", 2000),
            nested("{{ range .Data }}", "x", "{{ end }}", 2000),
            nested("{{ with .Data }}", "x", "{{ end }}", 2000),
            nested("{{ block \"b\" . }}", "x", "{{ end }}", 2000),
            format!("{{{{ print {} }}}}", nested("(", "1", ")", 2000)),
            format!(
                "{{{{ if .a }}}}{}{{{{ end }}}}",
                "{{ else if .b }}".repeat(2000)
            ),
            format!(
                "{{{{ define \"d\" }}}}{}{{{{ end }}}}",
                nested("{{ if . }}", "", "{{ end }}", 2000)
            ),
        ];
        for text in &deep {
            match go(text) {
                Err(ParseError::Limit(Limit::Nesting { limit, .. })) => assert_eq!(limit, 100),
                other => panic!("{}: {other:?}", &text[..40]),
            }
        }
        // The error says which limit and where.
        assert_eq!(
            problem(&format!("\n{}", nested("{{ if . }}", "", "{{ end }}", 101))),
            "nests deeper than the limit of 100 levels at line 2 (blocks and parentheses count together)"
        );
        // Blocks and parentheses count together: 99 ifs and 1 parenthesis fit, 2 do not.
        assert!(go(&nested("{{ if . }}", "{{ (1) }}", "{{ end }}", 99)).is_ok());
        assert!(
            problem(&nested("{{ if . }}", "{{ ((1)) }}", "{{ end }}", 99))
                .starts_with("nests deeper than the limit of 100 levels"),
        );
    }

    #[test]
    fn the_deepest_allowed_template_parses_on_a_small_stack() {
        // Half of the injector's 2 MiB worker stack is enough for the deepest template, even
        // unoptimized (about 7 KiB a level in a debug build, which needs the most).
        let text = nested(
            "{{ if . }}{{ range . }}{{ with . }}",
            &format!("{{{{ print {} }}}}", nested("(", "1", ")", 10)),
            "{{ end }}{{ end }}{{ end }}",
            30,
        );
        let parsed = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || go(&text).map(|t| t.root.len()))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(parsed, Ok(1));
    }

    #[test]
    fn size_is_bounded() {
        let text = "x".repeat(limits::MAX_TEMPLATE_BYTES + 1);
        assert_eq!(
            go(&text).unwrap_err(),
            ParseError::Limit(Limit::Size {
                size: limits::MAX_TEMPLATE_BYTES + 1,
                limit: limits::MAX_TEMPLATE_BYTES
            })
        );
        assert!(go(&"x".repeat(limits::MAX_TEMPLATE_BYTES)).is_ok());
    }

    #[test]
    fn unicode_names_as_go_lexes_them() {
        assert_eq!(
            tokenize(" .Data.data.ключ ").unwrap(),
            vec![Tok::Field(vec![
                "Data".into(),
                "data".into(),
                "ключ".into()
            ])]
        );
        assert_eq!(
            tokenize("$ключ := .日本語_1.ª٣").unwrap(),
            vec![
                Tok::Var("$ключ".into(), vec![]),
                Tok::Declare,
                Tok::Field(vec!["日本語_1".into(), "ª٣".into()]),
            ]
        );
        assert!(go("{{ $ключ := 1 }}{{ $ключ }}").is_ok());
        // An identifier that is not a known function is Go's error, not a panic.
        assert_eq!(
            parse("{{ ключ }}", "{{", "}}", &|f| Err(format!(
                "function {f:?} not defined"
            )))
            .unwrap_err()
            .to_string(),
            "line 1: function \"ключ\" not defined"
        );
        for (text, want) in [
            ("{{ .Data.🔑 }}", "line 1: bad character U+1F511 '🔑'"),
            ("{{ $🔑 := 1 }}", "line 1: bad character U+1F511 '🔑'"),
            (
                "{{ 🔑 }}",
                "line 1: unrecognized character in action: U+1F511 '🔑'",
            ),
            // A no-break space is not space to Go, and not printable.
            (
                "{{\u{a0}.Data }}",
                "line 1: unrecognized character in action: U+00A0",
            ),
            ("{{ .Data\u{a0}}}", "line 1: bad character U+00A0"),
            // A combining vowel sign (category Mc) is no letter to Go.
            ("{{ .नाम }}", "line 1: bad character U+093E 'ा'"),
            ("{{ 1ключ }}", "line 1: bad number syntax: \"1к\""),
            ("{{ print\"x\" }}", "line 1: bad character U+0022 '\"'"),
        ] {
            assert_eq!(problem(text), want, "{text}");
        }
    }

    #[test]
    fn no_byte_offset_splits_a_character() {
        // Multi-byte characters next to every place the splitter and lexer slice.
        for text in [
            "é{{ .x }}é",
            "{{é}}",
            "{{- é -}}",
            "{{ \"é\\",
            "{{ \"\\",
            "{{ 'é",
            "{{ `é",
            "{{/* é */}}é",
            "{{/* é",
            "{{ .x }é}",
            "ключ {{",
            "{{ \"ключ\" }}{{",
            "{{ 'ключ' }}",
            "{{ '\\u00e9' }}",
            "{{ \"\\xé\" }}",
            "{{ 0xé }}",
            "{{ (é) }}",
            "{{ ).é }}",
            "{{ -é }}",
        ] {
            let _ = go(text);
            let _ = parse(text, "«", "»", &any);
        }
        let t = parse("«.a» «- .b -» é", "«", "»", &any).unwrap();
        assert_eq!(t.root.len(), 3);
    }

    #[test]
    fn empty_delimiters_mean_the_default_ones() {
        let t = parse("{{ .a }}", "", "", &any).unwrap();
        assert!(matches!(t.root[0], Node::Action(_)));
    }

    #[test]
    fn what_go_refuses_is_refused() {
        for (text, want) in [
            ("{{ break }}", "{{break}} outside {{range}}"),
            (
                "{{ if . }}{{ continue }}{{ end }}",
                "{{continue}} outside {{range}}",
            ),
            (
                "{{ range . }}{{ else }}{{ break }}{{ end }}",
                "{{break}} outside {{range}}",
            ),
            (
                "{{ range . }}{{ define \"d\" }}{{ break }}{{ end }}{{ end }}",
                "{{define}} is allowed only at the top level",
            ),
            (
                "{{ define \"d\" }}{{ define \"e\" }}{{ end }}{{ end }}",
                "{{define}} is allowed only at the top level",
            ),
            (
                "{{ define \"d\" }}{{ break }}{{ end }}",
                "{{break}} outside {{range}}",
            ),
            (
                "{{ define \"d\" }}a{{ end }}{{ define \"d\" }}b{{ end }}",
                "multiple definition of template \"d\"",
            ),
            (
                "{{ block \"d\" . }}a{{ end }}{{ define \"d\" }}b{{ end }}",
                "multiple definition of template \"d\"",
            ),
            (
                "{{ if . }}{{ else with . }}{{ end }}",
                "unexpected \"with\" after {{else}} in {{if}}",
            ),
            (
                "{{ range . }}{{ else if . }}{{ end }}",
                "unexpected \"if\" after {{else}} in {{range}}",
            ),
            ("{{ $x }}", "undefined variable \"$x\""),
            (
                "{{ if $x := 1 }}{{ end }}{{ $x }}",
                "undefined variable \"$x\"",
            ),
            (
                "{{ $x := 1 }}{{ define \"d\" }}{{ $x }}{{ end }}",
                "undefined variable \"$x\"",
            ),
            ("{{ if . }}{{ end . }}", "unexpected \".\" in {{end}}"),
            (
                "{{ range . }}{{ break 1 }}{{ end }}",
                "unexpected 1 in {{break}}",
            ),
            ("{{ print if }}", "unexpected {{if}} in operand"),
            ("{{ 'ab' }}", "malformed character constant: 'ab'"),
            ("{{ \"\\x4\" }}", "bad escape \\x4"),
            ("{{ 0x }}", "bad number syntax: \"0x\""),
        ] {
            let got = problem(text);
            assert!(got.contains(want), "{text}: {got}");
        }
        // What Go accepts: an empty definition may be replaced, a block may hold a block,
        // break inside an if inside a range, variables of an enclosing block.
        for text in [
            "{{ define \"d\" }} {{ end }}{{ define \"d\" }}b{{ end }}",
            "{{ define \"d\" }}b{{ end }}{{ define \"d\" }}{{/* c */}}{{ end }}",
            "{{ block \"a\" . }}{{ block \"b\" . }}{{ end }}{{ end }}",
            "{{ range . }}{{ if . }}{{ break }}{{ else }}{{ continue }}{{ end }}{{ end }}",
            "{{ with $x := . }}{{ if . }}{{ $x }}{{ else if $y := 1 }}{{ $x }}{{ $y }}{{ end }}{{ end }}",
            "{{ range $i, $v := . }}{{ $i }}{{ $v }}{{ end }}",
        ] {
            assert!(go(text).is_ok(), "{text}: {:?}", go(text));
        }
        let t = go("{{ define \"d\" }}b{{ end }}{{ define \"d\" }} {{ end }}").unwrap();
        assert_eq!(*t.defines["d"], vec![Node::Text("b".into())]);
    }
}
