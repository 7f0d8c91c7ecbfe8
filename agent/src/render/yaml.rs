//! `toYAML` byte for byte as consul-template writes it with Go's yaml.v2: block style, keys in
//! yaml.v2's order (numbers inside keys compare by value), lists not indented under their key,
//! json.Number written as an int or a float when it parses as one, and each string in the
//! style libyaml's emitter picks for it (plain, single-quoted, double-quoted with escapes, or a
//! `|` literal block for text with line breaks), folded at 80 columns as libyaml folds it.

/// A value as yaml.v2 sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    /// A json.Number as yaml.v2 writes it: an int when it parses as one, else a float, else
    /// its text.
    pub fn number(text: &str) -> Node {
        text.parse::<i64>()
            .map(Node::Int)
            .or_else(|_| text.parse::<f64>().map(Node::Float))
            .unwrap_or_else(|_| Node::Str(text.to_string()))
    }

    /// Decoded JSON (numbers as json.Number) as yaml.v2 sees it.
    pub fn from_json(v: &serde_json::Value) -> Node {
        use serde_json::Value;
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::number(&n.to_string()),
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(items) => Node::Seq(items.iter().map(Node::from_json).collect()),
            Value::Object(m) => Node::Map(
                m.iter()
                    .map(|(k, v)| (k.clone(), Node::from_json(v)))
                    .collect(),
            ),
        }
    }
}

/// libyaml's `best_width`: plain and quoted scalars fold at a space past this column.
const WIDTH: usize = 80;

/// The document, trimmed as consul-template's `toYAML` trims it.
pub fn to_yaml(node: &Node) -> String {
    let mut w = Writer::default();
    match node {
        Node::Map(entries) if !entries.is_empty() => w.map(entries, 0),
        Node::Seq(items) if !items.is_empty() => w.seq(items, 0),
        scalar => w.scalar(scalar, 0, false),
    }
    w.out
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_string()
}

#[derive(Default)]
struct Writer {
    out: String,
    /// Characters on the current line.
    column: usize,
}

impl Writer {
    fn put(&mut self, s: &str) {
        for c in s.chars() {
            self.out.push(c);
            if c == '\n' {
                self.column = 0;
            } else {
                self.column += 1;
            }
        }
    }

    /// A new line indented to `indent`, unless the line is still empty up to there.
    fn indent(&mut self, indent: usize) {
        if self.column > indent || (self.column == indent && self.column > 0) {
            self.put("\n");
        }
        while self.column < indent {
            self.put(" ");
        }
    }

    fn map(&mut self, entries: &[(String, Node)], indent: usize) {
        let mut sorted: Vec<&(String, Node)> = entries.iter().collect();
        sorted.sort_by(|a, b| key_order(&a.0, &b.0));
        for (i, (key, value)) in sorted.into_iter().enumerate() {
            // The first key of a map in a list goes on the dash's line.
            if i > 0 || self.column != indent {
                self.indent(indent);
            }
            self.string(key, indent + 2, true);
            self.put(":");
            // A map under a key is indented; a list is not (yaml.v2's indentless sequences).
            self.value(value, "\n", indent + 2, indent);
        }
        self.end_line();
    }

    /// What follows `key:` or `-`: a block after `lead`, or a scalar on the same line.
    fn value(&mut self, value: &Node, lead: &str, map_indent: usize, seq_indent: usize) {
        match value {
            Node::Map(m) if !m.is_empty() => {
                self.put(lead);
                self.map(m, map_indent);
            }
            Node::Seq(s) if !s.is_empty() => {
                self.put(lead);
                self.seq(s, seq_indent);
            }
            scalar => self.scalar(scalar, map_indent, true),
        }
    }

    fn seq(&mut self, items: &[Node], indent: usize) {
        for (i, item) in items.iter().enumerate() {
            if i > 0 || self.column != indent {
                self.indent(indent);
            }
            self.put("-");
            // A map or list in a list starts on the dash's line.
            self.value(item, " ", indent + 2, indent + 2);
        }
        self.end_line();
    }

    fn end_line(&mut self) {
        if self.column > 0 {
            self.put("\n");
        }
    }

    /// A scalar (or an empty collection) after `key:` or `-`, continued at `indent`.
    fn scalar(&mut self, node: &Node, indent: usize, after_indicator: bool) {
        let text = match node {
            Node::Str(s) => {
                if after_indicator {
                    self.put(" ");
                }
                self.string(s, indent, false);
                return;
            }
            Node::Null => "null".to_string(),
            Node::Bool(b) => b.to_string(),
            Node::Int(n) => n.to_string(),
            Node::Float(f) => yaml_float(*f),
            Node::Seq(_) => "[]".to_string(),
            Node::Map(_) => "{}".to_string(),
        };
        if after_indicator {
            self.put(" ");
        }
        self.put(&text);
    }

    /// A string in the style yaml.v2 and libyaml choose; `key` strings never fold or use blocks.
    fn string(&mut self, s: &str, indent: usize, key: bool) {
        let facts = analyze(s);
        let style = if s.contains('\n') && !key {
            if facts.block_allowed {
                Style::Literal
            } else {
                Style::Double
            }
        } else if resolves_to_string(s) && !is_base60_float(s) {
            if facts.block_plain_allowed && !(key && s.is_empty()) {
                Style::Plain
            } else if facts.single_quoted_allowed {
                Style::Single
            } else {
                Style::Double
            }
        } else {
            Style::Double
        };
        match style {
            Style::Plain => self.folded(s, indent, !key, None),
            Style::Single => {
                self.put("'");
                self.folded(s, indent, !key, Some('\''));
                self.put("'");
            }
            Style::Double => self.double(s, indent, !key),
            Style::Literal => self.literal(s, indent),
        }
    }

    /// Plain or single-quoted text: a space past the width becomes a line break.
    fn folded(&mut self, s: &str, indent: usize, breaks: bool, quote: Option<char>) {
        let chars: Vec<char> = s.chars().collect();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if c == ' ' {
                let inside = quote.is_none() || (i != 0 && i != chars.len() - 1);
                if breaks
                    && !spaces
                    && self.column > WIDTH
                    && inside
                    && chars.get(i + 1) != Some(&' ')
                {
                    self.indent(indent);
                } else {
                    self.put(" ");
                }
                spaces = true;
            } else {
                if quote == Some(c) {
                    self.put("'");
                }
                self.out.push(c);
                self.column += 1;
                spaces = false;
            }
        }
    }

    fn double(&mut self, s: &str, indent: usize, breaks: bool) {
        self.put("\"");
        let chars: Vec<char> = s.chars().collect();
        let mut spaces = false;
        for (i, &c) in chars.iter().enumerate() {
            if !printable(c) || c == '\u{feff}' || is_break(c) || c == '"' || c == '\\' {
                let escaped = match c {
                    '\0' => "\\0".to_string(),
                    '\u{7}' => "\\a".into(),
                    '\u{8}' => "\\b".into(),
                    '\t' => "\\t".into(),
                    '\n' => "\\n".into(),
                    '\u{b}' => "\\v".into(),
                    '\u{c}' => "\\f".into(),
                    '\r' => "\\r".into(),
                    '\u{1b}' => "\\e".into(),
                    '"' => "\\\"".into(),
                    '\\' => "\\\\".into(),
                    '\u{85}' => "\\N".into(),
                    '\u{a0}' => "\\_".into(),
                    '\u{2028}' => "\\L".into(),
                    '\u{2029}' => "\\P".into(),
                    c if (c as u32) <= 0xff => format!("\\x{:02X}", c as u32),
                    c if (c as u32) <= 0xffff => format!("\\u{:04X}", c as u32),
                    c => format!("\\U{:08X}", c as u32),
                };
                self.put(&escaped);
                spaces = false;
            } else if c == ' ' {
                if breaks && !spaces && self.column > WIDTH && i != 0 && i != chars.len() - 1 {
                    self.indent(indent);
                    if chars.get(i + 1) == Some(&' ') {
                        self.put("\\");
                    }
                } else {
                    self.put(" ");
                }
                spaces = true;
            } else {
                self.out.push(c);
                self.column += 1;
                spaces = false;
            }
        }
        self.put("\"");
    }

    fn literal(&mut self, s: &str, indent: usize) {
        self.put("|");
        let first = s.chars().next();
        if first.is_some_and(|c| c == ' ' || is_break(c)) {
            self.put("2");
        }
        let mut rev = s.chars().rev();
        match (rev.next(), rev.next()) {
            (Some(last), _) if !is_break(last) => self.put("-"),
            (Some(_), None) => self.put("+"),
            (Some(_), Some(before)) if is_break(before) => self.put("+"),
            (None, _) => self.put("-"),
            _ => {}
        }
        self.put("\n");
        let mut at_break = true;
        for c in s.chars() {
            if is_break(c) {
                self.out.push(c);
                self.column = 0;
                at_break = true;
            } else {
                if at_break {
                    while self.column < indent {
                        self.put(" ");
                    }
                    at_break = false;
                }
                self.out.push(c);
                self.column += 1;
            }
        }
    }
}

enum Style {
    Plain,
    Single,
    Double,
    Literal,
}

fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// libyaml's `is_printable` (yaml.v2 emits Unicode): four-byte characters are not.
fn printable(c: char) -> bool {
    matches!(c as u32, 0x0a | 0x20..=0x7e | 0xa0..=0xd7ff | 0xe000..=0xfffd) && c != '\u{feff}'
}

/// What libyaml's `yaml_emitter_analyze_scalar` decides for block context.
struct Facts {
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
    block_allowed: bool,
}

fn analyze(s: &str) -> Facts {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return Facts {
            block_plain_allowed: false,
            single_quoted_allowed: true,
            block_allowed: false,
        };
    }
    let mut block_indicators = s.starts_with("---") || s.starts_with("...");
    let (mut leading_space, mut leading_break, mut trailing_space, mut trailing_break) =
        (false, false, false, false);
    let (mut break_space, mut space_break, mut special) = (false, false, false);
    let (mut previous_space, mut previous_break) = (false, false);
    let mut line_breaks = false;
    let mut preceded_by_whitespace = true;
    for (i, &c) in chars.iter().enumerate() {
        let next = chars.get(i + 1).copied();
        let followed_by_whitespace = next.is_none_or(|n| n == ' ' || n == '\t' || is_break(n));
        let last = i + 1 == chars.len();
        if i == 0 {
            match c {
                '#' | ',' | '[' | ']' | '{' | '}' | '&' | '*' | '!' | '|' | '>' | '\'' | '"'
                | '%' | '@' | '`' => block_indicators = true,
                '?' | ':' | '-' if followed_by_whitespace => block_indicators = true,
                _ => {}
            }
        } else {
            match c {
                ':' if followed_by_whitespace => block_indicators = true,
                '#' if preceded_by_whitespace => block_indicators = true,
                _ => {}
            }
        }
        if !printable(c) {
            special = true;
        }
        if is_break(c) {
            line_breaks = true;
        }
        let (space, brk) = (c == ' ', is_break(c));
        if space || brk {
            // A space or a break: at the start, at the end, or right after the other kind.
            let (leading, trailing, mixed, after_other) = if space {
                (
                    &mut leading_space,
                    &mut trailing_space,
                    &mut break_space,
                    previous_break,
                )
            } else {
                (
                    &mut leading_break,
                    &mut trailing_break,
                    &mut space_break,
                    previous_space,
                )
            };
            *leading |= i == 0;
            *trailing |= last;
            *mixed |= after_other;
        }
        previous_space = space;
        previous_break = brk;
        preceded_by_whitespace = c == ' ' || c == '\t' || is_break(c);
    }
    let mut facts = Facts {
        block_plain_allowed: true,
        single_quoted_allowed: true,
        block_allowed: true,
    };
    if leading_space || leading_break || trailing_space || trailing_break {
        facts.block_plain_allowed = false;
    }
    if trailing_space {
        facts.block_allowed = false;
    }
    if break_space {
        facts.block_plain_allowed = false;
        facts.single_quoted_allowed = false;
    }
    if space_break || special {
        facts = Facts {
            block_plain_allowed: false,
            single_quoted_allowed: false,
            block_allowed: false,
        };
    }
    if line_breaks || block_indicators {
        facts.block_plain_allowed = false;
    }
    facts
}

/// Whether yaml.v2 reads `s` back as a string when it is written plain (not a bool, null,
/// number or timestamp).
fn resolves_to_string(s: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "", "~", "null", "Null", "NULL", "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
        "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF",
        ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf",
        "-.Inf", "-.INF",
    ];
    if SPECIAL.contains(&s) {
        return false;
    }
    match s.as_bytes()[0] {
        b'.' => go_parse_float(s).is_none(),
        b'0'..=b'9' | b'+' | b'-' => {
            let plain: String = s.chars().filter(|&c| c != '_').collect();
            !(is_timestamp(s)
                || go_parse_int(&plain)
                || (yaml_style_float(&plain) && go_parse_float(&plain).is_some())
                || plain
                    .strip_prefix("0b")
                    .or_else(|| plain.strip_prefix("-0b"))
                    .is_some_and(|b| !b.is_empty() && b.chars().all(|c| c == '0' || c == '1')))
        }
        _ => true,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)` or `ParseUint` succeeding: decimal, 0x, 0o, 0b, or a
/// leading-0 octal, with a sign.
fn go_parse_int(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (digits, radix) = if let Some(h) = body.strip_prefix("0x").or(body.strip_prefix("0X")) {
        (h, 16)
    } else if let Some(o) = body.strip_prefix("0o").or(body.strip_prefix("0O")) {
        (o, 8)
    } else if let Some(b) = body.strip_prefix("0b").or(body.strip_prefix("0B")) {
        (b, 2)
    } else if body.len() > 1 && body.starts_with('0') {
        (&body[1..], 8)
    } else {
        (body, 10)
    };
    !digits.is_empty() && u64::from_str_radix(digits, radix).is_ok()
}

fn go_parse_float(s: &str) -> Option<f64> {
    s.parse::<f64>().ok()
}

/// yaml.v2's `yamlStyleFloat`: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`.
fn yaml_style_float(s: &str) -> bool {
    let b = s.strip_prefix(['+', '-']).unwrap_or(s).as_bytes();
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = 0;
    if b.first() == Some(&b'.') {
        let n = digits(1);
        if n == 0 {
            return false;
        }
        i = 1 + n;
    } else {
        let n = digits(0);
        if n == 0 {
            return false;
        }
        i += n;
        if b.get(i) == Some(&b'.') {
            i += 1 + digits(i + 1);
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let n = digits(i);
        if n == 0 {
            return false;
        }
        i += n;
    }
    i == b.len()
}

/// yaml.v2's timestamps: `2006-1-2`, optionally with `T`/`t`/space and `15:4:5(.frac)(zone)`.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) || b[4] != b'-' {
        return false;
    }
    let number = |i: &mut usize, max: usize| -> Option<u32> {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() && *i - start < max {
            *i += 1;
        }
        (*i > start).then(|| s[start..*i].parse().ok()).flatten()
    };
    let mut i = 5;
    let Some(month) = number(&mut i, 2) else {
        return false;
    };
    if b.get(i) != Some(&b'-') {
        return false;
    }
    i += 1;
    let Some(day) = number(&mut i, 2) else {
        return false;
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    if i == b.len() {
        return true;
    }
    if !matches!(b[i], b'T' | b't' | b' ') {
        return false;
    }
    let with_zone = b[i] != b' ';
    i += 1;
    for (n, max) in [(0, 23), (1, 59), (2, 59)] {
        if n > 0 {
            if b.get(i) != Some(&b':') {
                return false;
            }
            i += 1;
        }
        match number(&mut i, 2) {
            Some(v) if v <= max => {}
            _ => return false,
        }
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    let zone = &s[i..];
    let zone_ok = |z: &str| {
        let z = z.as_bytes();
        z.len() == 6
            && matches!(z[0], b'+' | b'-')
            && z[1..3].iter().all(u8::is_ascii_digit)
            && z[3] == b':'
            && z[4..6].iter().all(u8::is_ascii_digit)
    };
    if with_zone {
        zone == "Z" || zone_ok(zone)
    } else {
        zone.is_empty()
    }
}

/// yaml.v2's `isBase60Float`: `[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?`.
fn is_base60_float(s: &str) -> bool {
    let b = s.strip_prefix(['+', '-']).unwrap_or(s).as_bytes();
    if !b.first().is_some_and(u8::is_ascii_digit) {
        return false;
    }
    let mut i = 1;
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
        i += 1;
    }
    let mut groups = 0;
    while b.get(i) == Some(&b':') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 2 {
            i += 1;
        }
        let group = &b[start..i];
        let ok = match group {
            [d] => d.is_ascii_digit(),
            [t, _] => (b'0'..=b'5').contains(t),
            _ => false,
        };
        if !ok {
            return false;
        }
        groups += 1;
    }
    if groups == 0 {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
            i += 1;
        }
    }
    i == b.len()
}

/// yaml.v2's float text: Go's shortest `%g`, with `.inf`, `-.inf` and `.nan`.
fn yaml_float(f: f64) -> String {
    if f.is_nan() {
        ".nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { ".inf" } else { "-.inf" }.into()
    } else {
        super::go::format_float(f)
    }
}

/// The run of ASCII digits from `i`: where it ends, and its value read after `start`.
fn digit_run(chars: &[char], i: usize, start: i64) -> (usize, i64) {
    let mut end = i;
    let mut value = start;
    while end < chars.len() && chars[end].is_ascii_digit() {
        value = value
            .wrapping_mul(10)
            .wrapping_add(i64::from(chars[end] as u8 - b'0'));
        end += 1;
    }
    (end, value)
}

/// yaml.v2's key order: rune by rune, letters after other runes, runs of digits by value.
fn key_order(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (ar, br): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut i = 0;
    while i < ar.len() && i < br.len() {
        if ar[i] == br[i] {
            i += 1;
            continue;
        }
        let (al, bl) = (ar[i].is_alphabetic(), br[i].is_alphabetic());
        if al && bl {
            return ar[i].cmp(&br[i]);
        }
        if al || bl {
            return if bl {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        let (mut an, mut bn) = (0i64, 0i64);
        if ar[i] == '0' || br[i] == '0' {
            let mut j = i;
            while j > 0 && ar[j - 1].is_ascii_digit() {
                j -= 1;
                if ar[j] != '0' {
                    an = 1;
                    bn = 1;
                    break;
                }
            }
        }
        let (ai, an) = digit_run(&ar, i, an);
        let (bi, bn) = digit_run(&br, i, bn);
        if an != bn {
            return an.cmp(&bn);
        }
        if ai != bi {
            return ai.cmp(&bi);
        }
        return ar[i].cmp(&br[i]);
    }
    ar.len().cmp(&br.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Node {
        Node::Str(x.into())
    }
    fn map(entries: &[(&str, Node)]) -> Node {
        Node::Map(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn block_style_like_yaml_v2() {
        let v = map(&[
            (
                "b",
                Node::Seq(vec![
                    Node::Int(1),
                    s("two"),
                    map(&[("x", Node::Bool(true))]),
                    Node::Seq(vec![Node::Int(1), Node::Int(2)]),
                ]),
            ),
            (
                "a",
                map(&[
                    ("c", s("plain text")),
                    ("d", s("true")),
                    ("e", s("12")),
                    ("f", s("a: b")),
                    ("g", Node::Null),
                    ("h", Node::Seq(vec![])),
                ]),
            ),
        ]);
        assert_eq!(
            to_yaml(&v),
            "a:\n  c: plain text\n  d: \"true\"\n  e: \"12\"\n  f: 'a: b'\n  g: null\n  h: []\nb:\n- 1\n- two\n- x: true\n- - 1\n  - 2"
        );
        assert_eq!(to_yaml(&map(&[])), "{}");
    }

    #[test]
    fn string_styles_like_libyaml() {
        for (text, want) in [
            ("multi\nline\n", "|\n  multi\n  line"),
            ("no newline\nat end", "|-\n  no newline\n  at end"),
            (" lead", "' lead'"),
            ("tab\there", "\"tab\\there\""),
            ("", "\"\""),
            ("2006-01-02", "\"2006-01-02\""),
            ("1:20", "\"1:20\""),
            ("0x1F", "\"0x1F\""),
            ("1e3", "\"1e3\""),
            ("n", "\"n\""),
            ("a=1,b=2", "a=1,b=2"),
            ("<a href=\"x\">&'</a>", "<a href=\"x\">&'</a>"),
            ("{x}", "'{x}'"),
            ("it's", "it's"),
            ("'q'", "'''q'''"),
            ("emoji 🔑", "\"emoji \\U0001F511\""),
        ] {
            assert_eq!(
                to_yaml(&map(&[("k", s(text))]))["k: ".len()..],
                *want,
                "{text:?}"
            );
        }
        let long = format!("{{{}", "word ".repeat(20));
        assert_eq!(
            to_yaml(&map(&[("k", s(long.trim_end()))])),
            format!(
                "k: '{{{}\n  word word word word'",
                "word ".repeat(16).trim_end()
            )
        );
    }

    #[test]
    fn keys_in_yaml_v2_order() {
        let mut keys = vec!["a10", "a9", "b", "A", "_x", "a", "1", "10", "2"];
        keys.sort_by(|a, b| key_order(a, b));
        assert_eq!(keys, ["_x", "1", "2", "10", "A", "a", "a9", "a10", "b"]);
    }
}
