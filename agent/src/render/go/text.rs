//! Text functions as Go and consul-template define them: case mapping per rune (Go's simple
//! Unicode mapping, not Rust's full one), `toTitle` (x/text/cases title casing without
//! lowering), Go's `html`, `js` and `urlquery` escapers, regular expressions (RE2 syntax, which
//! the regex crate shares, with Go's ASCII Perl classes), and the hex digests (SHA-256 and HMAC
//! from `ring`, which the TLS stack links anyway).

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// `strings.ToUpper`: each rune's simple upper case; a rune whose upper case is several runes
/// (ß, ﬁ) has no simple mapping and stays.
pub fn to_upper(s: &str) -> String {
    s.chars()
        .map(|c| {
            let code = c as u32;
            // Greek with ypogegrammeni map to their title-case forms in Go (ᾳ → ᾼ).
            let iota = matches!(code, 0x1F80..=0x1F87 | 0x1F90..=0x1F97 | 0x1FA0..=0x1FA7)
                .then_some(code + 8)
                .or(match code {
                    0x1FB3 => Some(0x1FBC),
                    0x1FC3 => Some(0x1FCC),
                    0x1FF3 => Some(0x1FFC),
                    _ => None,
                });
            if let Some(u) = iota.and_then(char::from_u32) {
                return u;
            }
            let mut up = c.to_uppercase();
            match (up.next(), up.next()) {
                (Some(u), None) => u,
                _ => c,
            }
        })
        .collect()
}

/// `strings.ToLower`: each rune's simple lower case (İ → i).
pub fn to_lower(s: &str) -> String {
    s.chars()
        .map(|c| c.to_lowercase().next().unwrap_or(c))
        .collect()
}

/// Whether `c` keeps a word going for title casing: letters, digits, marks, the connector `_`
/// and the Unicode word-break "mid" letters (`'`, `.`, `:`…); anything else ends the word.
fn in_word(c: char) -> bool {
    c.is_alphanumeric()
        || c.general_category_group() == GeneralCategoryGroup::Mark
        || matches!(
            c,
            '_' | '\''
                | '.'
                | ':'
                | '\u{b7}'
                | '\u{387}'
                | '\u{5f4}'
                | '\u{2018}'
                | '\u{2019}'
                | '\u{2024}'
                | '\u{2027}'
                | '\u{fe13}'
                | '\u{fe52}'
                | '\u{fe55}'
                | '\u{ff07}'
                | '\u{ff0e}'
                | '\u{ff1a}'
        )
}

/// The title case of one rune: the digraphs have their own (ǆ → ǅ); a rune whose upper case
/// is several runes keeps the first upper and lowers the rest (ﬁ → Fi, ß → Ss).
fn title_rune(c: char, out: &mut String) {
    let digraph = match c {
        'Ǆ' | 'ǅ' | 'ǆ' => Some('ǅ'),
        'Ǉ' | 'ǈ' | 'ǉ' => Some('ǈ'),
        'Ǌ' | 'ǋ' | 'ǌ' => Some('ǋ'),
        'Ǳ' | 'ǲ' | 'ǳ' => Some('ǲ'),
        _ => None,
    };
    if let Some(t) = digraph {
        out.push(t);
        return;
    }
    for (i, u) in c.to_uppercase().enumerate() {
        if i == 0 {
            out.push(u);
        } else {
            out.extend(u.to_lowercase());
        }
    }
}

/// `toTitle`: the first cased letter of each word in title case, the rest as it is.
pub fn to_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut titled = false;
    for c in s.chars() {
        if !in_word(c) {
            titled = false;
            out.push(c);
        } else if !titled && c.is_alphabetic() {
            titled = true;
            title_rune(c, &mut out);
        } else {
            out.push(c);
        }
    }
    out
}

/// Each character as `escape` has it, or as it is.
fn escaped(s: &str, escape: impl Fn(char) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match escape(c) {
            Some(e) => out.push_str(&e),
            None => out.push(c),
        }
    }
    out
}

/// Go's `template.HTMLEscapeString`.
pub fn html(s: &str) -> String {
    escaped(s, |c| {
        Some(
            match c {
                '"' => "&#34;",
                '\'' => "&#39;",
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '\0' => "\u{fffd}",
                _ => return None,
            }
            .to_string(),
        )
    })
}

/// Go's `unicode.IsPrint`: letters, marks, numbers, punctuation, symbols and the ASCII space.
pub fn go_printable(c: char) -> bool {
    use GeneralCategoryGroup::*;
    c == ' '
        || matches!(
            c.general_category_group(),
            Letter | Mark | Number | Punctuation | Symbol
        )
}

/// Go's `template.JSEscapeString`.
pub fn js(s: &str) -> String {
    escaped(s, |c| {
        Some(match c {
            '\\' => "\\\\".to_string(),
            '\'' => "\\'".to_string(),
            '"' => "\\\"".to_string(),
            '<' => "\\u003C".to_string(),
            '>' => "\\u003E".to_string(),
            '&' => "\\u0026".to_string(),
            '=' => "\\u003D".to_string(),
            c if (c as u32) < 0x20 || (!c.is_ascii() && !go_printable(c)) => {
                format!("\\u{:04X}", c as u32)
            }
            _ => return None,
        })
    })
}

/// Go's `url.QueryEscape` (what `urlquery` applies).
pub fn urlquery(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A Go (RE2) pattern in the regex crate's syntax. Both take RE2's syntax, but Go's Perl classes
/// and word boundaries are ASCII (`\d` is `[0-9]`, `\w` `[0-9A-Za-z_]`, `\s` `[\t\n\f\r ]`, `\b`
/// between an ASCII word character and anything else) where the crate's are Unicode; `\Q…\E` is
/// literal text; and in a class `[` is a plain character (unless it opens `[:name:]`) where the
/// crate nests classes and reads `&&` and `~~` as set operations.
pub fn go_pattern(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut rest = pattern;
    // Inside a class, and whether a `]` now is still the class's first character (a literal).
    let (mut in_class, mut class_first) = (false, false);
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        let first = std::mem::take(&mut class_first);
        match c {
            '\\' => {
                let Some(e) = rest.chars().next() else {
                    out.push('\\');
                    break;
                };
                rest = &rest[e.len_utf8()..];
                let ascii = match e {
                    'd' => "[0-9]",
                    'D' => "[^0-9]",
                    'w' => "[0-9A-Za-z_]",
                    'W' => "[^0-9A-Za-z_]",
                    's' => r"[\t\n\x0C\r\x20]",
                    'S' => r"[^\t\n\x0C\r\x20]",
                    'b' if !in_class => r"(?-u:\b)",
                    'B' if !in_class => r"(?-u:\B)",
                    'Q' if !in_class => {
                        let (quoted, after) = rest.split_once(r"\E").unwrap_or((rest, ""));
                        out.push_str(&regex::escape(quoted));
                        rest = after;
                        continue;
                    }
                    _ => {
                        out.push('\\');
                        out.push(e);
                        continue;
                    }
                };
                out.push_str(ascii);
            }
            '[' if !in_class => {
                out.push('[');
                in_class = true;
                class_first = true;
                if let Some(after) = rest.strip_prefix('^') {
                    out.push('^');
                    rest = after;
                }
            }
            '[' => match rest.strip_prefix(':').and_then(|r| r.split_once(":]")) {
                Some((name, after)) => {
                    out.push_str("[:");
                    out.push_str(name);
                    out.push_str(":]");
                    rest = after;
                }
                None => out.push_str(r"\["),
            },
            ']' if in_class && !first => {
                out.push(']');
                in_class = false;
            }
            '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A Go pattern compiled, or the crate's reason for refusing it.
pub fn go_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&go_pattern(pattern))
}

fn regex(name: &str, pattern: &str) -> Result<regex::Regex, String> {
    go_regex(pattern).map_err(|e| {
        let first = e.to_string();
        let why = first.lines().last().unwrap_or_default().trim().to_string();
        format!(
            "{name}: error parsing regexp {}: {why}",
            super::funcs::withheld(pattern)
        )
    })
}

/// `regexMatch pattern s`.
pub fn regex_match(pattern: &str, s: &str) -> Result<bool, String> {
    Ok(regex("regexMatch", pattern)?.is_match(s))
}

/// `regexReplaceAll pattern replacement s`, `$1` and `${name}` expanded as Go's `Expand` does.
pub fn regex_replace_all(pattern: &str, replacement: &str, s: &str) -> Result<String, String> {
    Ok(regex("regexReplaceAll", pattern)?
        .replace_all(s, replacement)
        .into_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(input: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, input).as_ref())
}

pub fn md5_hex(input: &[u8]) -> String {
    hex(&super::md5::digest(input))
}

/// `hmacSHA256Hex message key`.
pub fn hmac_sha256_hex(message: &[u8], key: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex(ring::hmac::sign(&key, message).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_mapping_is_go_simple_mapping() {
        assert_eq!(to_upper("héllo ǆ straße ﬁ ᾳ µ ı"), "HÉLLO Ǆ STRAßE ﬁ ᾼ Μ I");
        assert_eq!(to_lower("ǅ ß İ Ω K Å"), "ǆ ß i ω k å");
    }

    #[test]
    fn title_case_like_consul_template() {
        assert_eq!(to_title("hELLO wORLD"), "HELLO WORLD");
        assert_eq!(to_title("o'neil 3rd x.y a:b a1b"), "O'neil 3Rd X.y A:b A1b");
        assert_eq!(
            to_title("ﬁsh ßa ǳa a,b;c(d)e a-b_c"),
            "Fish Ssa ǲa A,B;C(D)E A-B_c"
        );
    }

    #[test]
    fn escapers_match_go() {
        assert_eq!(html("<a>&'\"\0"), "&lt;a&gt;&amp;&#39;&#34;\u{fffd}");
        assert_eq!(
            js("a'b\"<>\n\u{a0}x=y é\u{2028}"),
            "a\\'b\\\"\\u003C\\u003E\\u000A\\u00A0x\\u003Dy é\\u2028"
        );
        assert_eq!(urlquery("a b&c=d é~"), "a+b%26c%3Dd+%C3%A9~");
    }

    #[test]
    fn regexes_and_digests() {
        assert_eq!(regex_match("^a.c$", "abc"), Ok(true));
        assert_eq!(regex_replace_all("(a)(b)", "$2$1", "abab").unwrap(), "baba");
        assert!(regex_match("[", "x").unwrap_err().contains("regexMatch"));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            hmac_sha256_hex(b"msg", b"key"),
            "2d93cbc1be167bcb1637a4a23cbff01a7878f0c50ee833954ea5221bb1b8c628"
        );
    }

    #[test]
    fn go_perl_classes_and_word_boundaries_are_ascii() {
        let m = |p: &str, s: &str| regex_match(p, s).unwrap();
        assert!(m(r"^\d+$", "0123456789"));
        assert!(!m(r"\d", "١٢٣"));
        assert!(m(r"\D", "١"));
        assert!(m(r"^\w+$", "aZ_09"));
        assert!(!m(r"\w", "é"));
        assert!(m(r"^\W$", "é"));
        assert!(m(r"^\s+$", "\t\n\x0C\r "));
        assert!(!m(r"\s", "\u{a0}\u{2003}\x0B"));
        assert!(m(r"^\S$", "\u{a0}"));
        assert_eq!(regex_replace_all(r"\bx", "_", "éx x").unwrap(), "é_ _");
        assert_eq!(regex_replace_all(r"\B", "-", "ab é").unwrap(), "a-b -é-");
        // In a class too, and negated classes nest.
        assert_eq!(regex_replace_all(r"[\d\s]", "_", "1 ١").unwrap(), "__١");
        assert_eq!(regex_replace_all(r"[^\W]", "_", "aé").unwrap(), "_é");
        // Unicode where Go is: case folding, categories, scripts.
        assert!(m(r"(?i)σ", "Σ"));
        assert!(m(r"(?i)k", "\u{212a}"));
        assert!(m(r"^\pL+$", "héllo"));
        assert!(m(r"^\p{Greek}+$", "αβγ"));
        assert!(!m(r"[[:alpha:]]", "é"));
        assert!(m(r"^[[:^alpha:]]$", "é"));
    }

    #[test]
    fn go_literal_text_and_class_syntax() {
        let r = |p: &str, s: &str| regex_replace_all(p, "_", s).unwrap();
        assert_eq!(r(r"\Q.*\E", "a.*b.c"), "a_b.c");
        assert_eq!(r(r"a\Q+(", "a+(b"), "_b");
        assert_eq!(r(r"\\d", r"\d1"), "_1");
        // `[` in a class is a character; `&&` and `~~` are characters, not set operations.
        assert_eq!(r(r"[[a]", "[a]"), "__]");
        assert_eq!(r(r"[a&&b]", "a&b"), "___");
        assert_eq!(r(r"[a~~b]", "a~b"), "___");
        // A `]` first in a class is a character.
        assert_eq!(r(r"[]a]", "]a"), "__");
        assert_eq!(r(r"[^]a]", "]ab"), "]a_");
        assert_eq!(go_pattern(r"x\"), r"x\");
    }
}
