//! Text functions as Go and consul-template define them: case mapping per rune (Go's simple
//! Unicode mapping, not Rust's full one), `toTitle` (x/text/cases title casing without
//! lowering), Go's `html`, `js` and `urlquery` escapers, regular expressions (RE2 syntax, which
//! the regex crate shares), and the hex digests.

use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
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

fn regex(name: &str, pattern: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(pattern).map_err(|e| {
        let first = e.to_string();
        let why = first.lines().last().unwrap_or_default().trim().to_string();
        format!("{name}: error parsing regexp {pattern:?}: {why}")
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
    hex(&Sha256::digest(input))
}

pub fn md5_hex(input: &[u8]) -> String {
    hex(&Md5::digest(input))
}

/// `hmacSHA256Hex message key`.
pub fn hmac_sha256_hex(message: &[u8], key: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any size");
    mac.update(message);
    hex(&mac.finalize().into_bytes())
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
        assert_eq!(
            hmac_sha256_hex(b"msg", b"key"),
            "2d93cbc1be167bcb1637a4a23cbff01a7878f0c50ee833954ea5221bb1b8c628"
        );
    }
}
