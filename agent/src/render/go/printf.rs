//! Go's `fmt` for template values: `printf` with every verb, flag, width, precision, `*` and
//! `%[n]` argument index Go has, applied element by element to lists and maps, with Go's
//! `%!verb(type=value)`, `MISSING`, `EXTRA`, `BADINDEX`, `BADWIDTH`, `BADPREC` and `NOVERB`; and
//! `%v` itself, which every printed value goes through.

use super::exec::Val;
use super::text::go_printable;
use crate::render::limits::{Limit, MAX_TEXT_BYTES};

/// A width or precision past this is Go's "too large" (the rest of the format is dropped).
const TOO_LARGE: usize = 1_000_000;

#[derive(Clone, Copy, Default)]
struct Flags {
    plus: bool,
    minus: bool,
    sharp: bool,
    space: bool,
    zero: bool,
    plus_v: bool,
    sharp_v: bool,
    wid: Option<usize>,
    prec: Option<usize>,
}

/// Go's `%v` of a value.
pub fn print(v: &Val) -> String {
    let mut p = Printer::default();
    p.arg(v, 'v');
    p.out
}

/// `fmt.Sprintf(format, args...)`, within `MAX_TEXT_BYTES`.
pub fn sprintf(format: &str, args: &[Val]) -> Result<String, Limit> {
    let mut p = Printer::default();
    let f = format.as_bytes();
    let end = f.len();
    let mut arg_num = 0;
    let mut reordered = false;
    let mut i = 0;
    while i < end {
        let start = i;
        while i < end && f[i] != b'%' {
            i += 1;
        }
        p.out.push_str(&format[start..i]);
        if i >= end {
            break;
        }
        i += 1;
        p.flags = Flags::default();
        let mut good_arg_num = true;
        while i < end {
            match f[i] {
                b'#' => p.flags.sharp = true,
                b'0' => p.flags.zero = !p.flags.minus,
                b'+' => p.flags.plus = true,
                b'-' => {
                    p.flags.minus = true;
                    p.flags.zero = false;
                }
                b' ' => p.flags.space = true,
                _ => break,
            }
            i += 1;
        }
        let mut after_index;
        (arg_num, i, after_index) =
            arg_number(&mut reordered, &mut good_arg_num, arg_num, f, i, args.len());
        let Some(width) = amount(args, &mut arg_num, f, &mut i) else {
            p.out.push_str("%!(NOVERB)");
            break;
        };
        match width {
            Amount::Star { value, ok } => {
                if !ok {
                    p.out.push_str("%!(BADWIDTH)");
                }
                p.flags.wid = ok.then_some(value.unsigned_abs() as usize);
                if value < 0 {
                    p.flags.minus = true;
                    p.flags.zero = false;
                }
                after_index = false;
            }
            Amount::Digits(n) => {
                p.flags.wid = n;
                if after_index && n.is_some() {
                    good_arg_num = false;
                }
            }
        }
        if i + 1 < end && f[i] == b'.' {
            i += 1;
            if after_index {
                good_arg_num = false;
            }
            (arg_num, i, after_index) =
                arg_number(&mut reordered, &mut good_arg_num, arg_num, f, i, args.len());
            let Some(precision) = amount(args, &mut arg_num, f, &mut i) else {
                p.out.push_str("%!(NOVERB)");
                break;
            };
            match precision {
                Amount::Star { value, ok } => {
                    p.flags.prec = (ok && value >= 0).then_some(value as usize);
                    if p.flags.prec.is_none() {
                        p.out.push_str("%!(BADPREC)");
                    }
                    after_index = false;
                }
                Amount::Digits(n) => p.flags.prec = Some(n.unwrap_or(0)),
            }
        }
        if !after_index {
            (arg_num, i, _) =
                arg_number(&mut reordered, &mut good_arg_num, arg_num, f, i, args.len());
        }
        if i >= end {
            p.out.push_str("%!(NOVERB)");
            break;
        }
        let verb = format[i..].chars().next().expect("i is on a character");
        i += verb.len_utf8();
        if p.out.len() > MAX_TEXT_BYTES {
            return Err(Limit::Text {
                limit: MAX_TEXT_BYTES,
            });
        }
        match verb {
            '%' => p.out.push('%'),
            _ if !good_arg_num => p.out.push_str(&format!("%!{verb}(BADINDEX)")),
            _ if arg_num >= args.len() => p.out.push_str(&format!("%!{verb}(MISSING)")),
            _ => {
                if verb == 'v' {
                    p.flags.sharp_v = p.flags.sharp;
                    p.flags.sharp = false;
                    p.flags.plus_v = p.flags.plus;
                    p.flags.plus = false;
                }
                p.arg(&args[arg_num], verb);
                arg_num += 1;
            }
        }
    }
    if !reordered && arg_num < args.len() {
        p.flags = Flags::default();
        p.out.push_str("%!(EXTRA ");
        for (n, a) in args[arg_num..].iter().enumerate() {
            if n > 0 {
                p.out.push_str(", ");
            }
            if matches!(a, Val::NoValue | Val::Nil) {
                p.out.push_str("<nil>");
            } else {
                p.out.push_str(a.type_name());
                p.out.push('=');
                p.arg(a, 'v');
            }
        }
        p.out.push(')');
    }
    if p.out.len() > MAX_TEXT_BYTES {
        return Err(Limit::Text {
            limit: MAX_TEXT_BYTES,
        });
    }
    Ok(p.out)
}

/// A width or precision as written: `*` (the next argument, and whether it is an int) or digits.
enum Amount {
    Star { value: i64, ok: bool },
    Digits(Option<usize>),
}

/// The width or precision at `i`; None when its digits grow too large (Go's NOVERB).
fn amount(args: &[Val], arg_num: &mut usize, f: &[u8], i: &mut usize) -> Option<Amount> {
    if *i < f.len() && f[*i] == b'*' {
        *i += 1;
        let (value, ok, next) = int_from_arg(args, *arg_num);
        *arg_num = next;
        return Some(Amount::Star { value, ok });
    }
    let (n, next) = parse_num(f, *i);
    *i = next;
    n.map(Amount::Digits)
}

/// Go's `parsenum`: Some(None) for no digits, None when the number grows too large.
fn parse_num(f: &[u8], mut i: usize) -> (Option<Option<usize>>, usize) {
    let start = i;
    let mut num = 0usize;
    while i < f.len() && f[i].is_ascii_digit() {
        if num > TOO_LARGE {
            return (None, f.len());
        }
        num = num * 10 + usize::from(f[i] - b'0');
        i += 1;
    }
    (Some((i > start).then_some(num)), i)
}

/// Go's `argNumber`: an explicit `[n]` index (1-based) at `i`.
fn arg_number(
    reordered: &mut bool,
    good: &mut bool,
    arg_num: usize,
    f: &[u8],
    i: usize,
    n_args: usize,
) -> (usize, usize, bool) {
    if f.len() <= i || f[i] != b'[' {
        return (arg_num, i, false);
    }
    *reordered = true;
    let rest = &f[i..];
    let parsed = (|| {
        if rest.len() < 3 {
            return (None, 1);
        }
        for j in 1..rest.len() {
            if rest[j] == b']' {
                let (n, next) = parse_num(rest, 1);
                return match n {
                    Some(Some(n)) if next == j => (n.checked_sub(1), j + 1),
                    _ => (None, j + 1),
                };
            }
        }
        (None, 1)
    })();
    match parsed {
        (Some(index), width) if index < n_args => (index, i + width, true),
        (ok, width) => {
            *good = false;
            (arg_num, i + width, ok.is_some())
        }
    }
}

/// Go's `intFromArg` for `*`: the argument as an int, and whether it was one.
fn int_from_arg(args: &[Val], arg_num: usize) -> (i64, bool, usize) {
    match args.get(arg_num) {
        Some(Val::Int(n)) if n.unsigned_abs() <= TOO_LARGE as u64 => (*n, true, arg_num + 1),
        Some(_) => (0, false, arg_num + 1),
        None => (0, false, arg_num),
    }
}

#[derive(Default)]
struct Printer {
    out: String,
    flags: Flags,
}

impl Printer {
    /// `printArg`: a top-level operand.
    fn arg(&mut self, v: &Val, verb: char) {
        if matches!(v, Val::NoValue | Val::Nil) {
            match verb {
                'T' | 'v' => self.pad("<nil>"),
                _ => self.bad_verb(verb, v),
            }
            return;
        }
        if verb == 'T' {
            self.fmt_s(v.type_name());
            return;
        }
        self.value(v, verb, 0);
    }

    /// `printValue`: a value at `depth` (0 for the operand itself).
    fn value(&mut self, v: &Val, verb: char, depth: usize) {
        match v {
            Val::NoValue | Val::Nil => {
                if self.flags.sharp_v {
                    self.out.push_str("interface {}(nil)");
                } else {
                    self.out.push_str("<nil>");
                }
            }
            Val::NilPtr(type_name) => match verb {
                'v' if self.flags.sharp_v => self.out.push_str(&format!("({type_name})(nil)")),
                'v' => self.pad("<nil>"),
                _ => self.bad_verb(verb, v),
            },
            Val::Bool(b) => match verb {
                't' | 'v' => self.pad(if *b { "true" } else { "false" }),
                _ => self.bad_verb(verb, v),
            },
            Val::Int(n) => self.integer(*n, verb, v),
            Val::Float(x) => self.float(*x, verb, v),
            Val::Str(s) | Val::Number(s) => self.string(s.as_bytes(), verb, v),
            Val::Bytes(b) => self.string(b, verb, v),
            Val::List(items) | Val::Strings(items) => {
                // `[a b]`, or Go syntax for %#v: `[]string{"a", "b"}`.
                let (open, sep, close) = if self.flags.sharp_v {
                    self.out.push_str(v.type_name());
                    ('{', ", ", '}')
                } else {
                    ('[', " ", ']')
                };
                self.out.push(open);
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(sep);
                    }
                    self.value(item, verb, depth + 1);
                }
                self.out.push(close);
            }
            Val::Map(m) => {
                if self.flags.sharp_v {
                    self.out.push_str(v.type_name());
                    self.out.push('{');
                } else {
                    self.out.push_str("map[");
                }
                for (i, (k, item)) in m.iter().enumerate() {
                    if i > 0 {
                        self.out
                            .push_str(if self.flags.sharp_v { ", " } else { " " });
                    }
                    self.string(k.as_bytes(), verb, &Val::Str(k.clone()));
                    self.out.push(':');
                    self.value(item, verb, depth + 1);
                }
                self.out.push(if self.flags.sharp_v { '}' } else { ']' });
            }
            Val::Secret(s) => {
                if depth == 0 {
                    self.out.push('&');
                }
                self.secret(&s.json, verb, depth);
            }
        }
    }

    /// consul-template's `dependency.Secret` struct, field by field.
    fn secret(&mut self, json: &serde_json::Value, verb: char, depth: usize) {
        let text = |k: &str| Val::Str(json[k].as_str().unwrap_or_default().to_string());
        let warnings = match &json["warnings"] {
            serde_json::Value::Array(w) => {
                Val::List(std::rc::Rc::new(w.iter().map(Val::from_json).collect()))
            }
            _ => Val::List(std::rc::Rc::new(Vec::new())),
        };
        let fields = [
            ("RequestID", text("request_id")),
            ("LeaseID", text("lease_id")),
            (
                "LeaseDuration",
                Val::Int(json["lease_duration"].as_i64().unwrap_or(0)),
            ),
            (
                "Renewable",
                Val::Bool(json["renewable"].as_bool().unwrap_or(false)),
            ),
            ("Data", Val::from_json(&json["data"])),
            ("Warnings", warnings),
            ("Auth", Val::NilPtr("*dependency.SecretAuth")),
            ("WrapInfo", Val::NilPtr("*dependency.SecretWrapInfo")),
        ];
        if self.flags.sharp_v {
            self.out.push_str("dependency.Secret");
        }
        self.out.push('{');
        for (i, (name, field)) in fields.iter().enumerate() {
            if i > 0 {
                self.out
                    .push_str(if self.flags.sharp_v { ", " } else { " " });
            }
            if self.flags.plus_v || self.flags.sharp_v {
                self.out.push_str(name);
                self.out.push(':');
            }
            self.value(field, verb, depth + 1);
        }
        self.out.push('}');
    }

    fn bad_verb(&mut self, verb: char, v: &Val) {
        self.out.push_str("%!");
        self.out.push(verb);
        self.out.push('(');
        match v {
            Val::NoValue | Val::Nil => self.out.push_str("<nil>"),
            other => {
                self.out.push_str(other.type_name());
                self.out.push('=');
                let saved = self.flags;
                self.arg(other, 'v');
                self.flags = saved;
            }
        }
        self.out.push(')');
    }

    /// Padding to the width: zeros on the left when asked, spaces otherwise.
    fn pad(&mut self, s: &str) {
        let Some(wid) = self.flags.wid else {
            self.out.push_str(s);
            return;
        };
        let n = s.chars().count();
        if n >= wid {
            self.out.push_str(s);
            return;
        }
        let fill = if self.flags.zero { '0' } else { ' ' };
        if self.flags.minus {
            self.out.push_str(s);
            self.out.extend(std::iter::repeat_n(' ', wid - n));
        } else {
            self.out.extend(std::iter::repeat_n(fill, wid - n));
            self.out.push_str(s);
        }
    }

    fn pad_spaces(&mut self, s: &str) {
        let zero = std::mem::replace(&mut self.flags.zero, false);
        self.pad(s);
        self.flags.zero = zero;
    }

    fn fmt_s(&mut self, s: &str) {
        match self.flags.prec {
            Some(p) => {
                let cut: String = s.chars().take(p).collect();
                self.pad(&cut);
            }
            None => self.pad(s),
        }
    }

    fn string(&mut self, b: &[u8], verb: char, v: &Val) {
        let s = String::from_utf8_lossy(b);
        match verb {
            'v' if self.flags.sharp_v => self.quoted(&s),
            'v' | 's' => self.fmt_s(&s),
            'x' | 'X' => self.hex_bytes(b, verb == 'X'),
            'q' => self.quoted(&s),
            _ => self.bad_verb(verb, v),
        }
    }

    fn quoted(&mut self, s: &str) {
        let s: String = match self.flags.prec {
            Some(p) => s.chars().take(p).collect(),
            None => s.to_string(),
        };
        if self.flags.sharp && can_backquote(&s) {
            self.pad(&format!("`{s}`"));
        } else {
            let q = quote(&s, '"', self.flags.plus);
            self.pad(&q);
        }
    }

    fn hex_bytes(&mut self, b: &[u8], upper: bool) {
        let length = self.flags.prec.map_or(b.len(), |p| p.min(b.len()));
        let mut width = 2 * length;
        if width == 0 {
            if let Some(w) = self.flags.wid {
                self.out.extend(std::iter::repeat_n(' ', w));
            }
            return;
        }
        if self.flags.space {
            if self.flags.sharp {
                width *= 2;
            }
            width += length - 1;
        } else if self.flags.sharp {
            width += 2;
        }
        let wid = self.flags.wid.unwrap_or(0);
        if wid > width && !self.flags.minus {
            let fill = if self.flags.zero { '0' } else { ' ' };
            self.out.extend(std::iter::repeat_n(fill, wid - width));
        }
        let prefix = if upper { "0X" } else { "0x" };
        if self.flags.sharp {
            self.out.push_str(prefix);
        }
        for (i, byte) in b[..length].iter().enumerate() {
            if self.flags.space && i > 0 {
                self.out.push(' ');
                if self.flags.sharp {
                    self.out.push_str(prefix);
                }
            }
            if upper {
                self.out.push_str(&format!("{byte:02X}"));
            } else {
                self.out.push_str(&format!("{byte:02x}"));
            }
        }
        if wid > width && self.flags.minus {
            self.out.extend(std::iter::repeat_n(' ', wid - width));
        }
    }

    fn integer(&mut self, n: i64, verb: char, v: &Val) {
        let base = match verb {
            'v' | 'd' => 10,
            'b' => 2,
            'o' | 'O' => 8,
            'x' | 'X' => 16,
            'c' => {
                let c = u32::try_from(n)
                    .ok()
                    .and_then(char::from_u32)
                    .unwrap_or('\u{fffd}');
                self.pad_spaces(&c.to_string());
                return;
            }
            'q' => {
                let c = u32::try_from(n)
                    .ok()
                    .and_then(char::from_u32)
                    .unwrap_or('\u{fffd}');
                let q = quote(&c.to_string(), '\'', self.flags.plus);
                self.pad_spaces(&q);
                return;
            }
            'U' => {
                let mut s = format!(
                    "U+{:0width$X}",
                    n as u64,
                    width = self.flags.prec.unwrap_or(4).max(4)
                );
                if self.flags.sharp
                    && let Some(c) = u32::try_from(n).ok().and_then(char::from_u32)
                    && go_printable(c)
                {
                    s.push_str(&format!(" '{c}'"));
                }
                self.pad_spaces(&s);
                return;
            }
            _ => return self.bad_verb(verb, v),
        };
        let negative = n < 0;
        let u = n.unsigned_abs();
        let mut prec = 0;
        if let Some(p) = self.flags.prec {
            prec = p;
            if p == 0 && u == 0 {
                let w = self.flags.wid.unwrap_or(0);
                self.out.extend(std::iter::repeat_n(' ', w));
                return;
            }
        } else if self.flags.zero && !self.flags.minus && self.flags.wid.is_some() {
            prec = self.flags.wid.unwrap_or(0);
            if negative || self.flags.plus || self.flags.space {
                prec = prec.saturating_sub(1);
            }
        }
        let mut digits = match base {
            2 => format!("{u:b}"),
            8 => format!("{u:o}"),
            16 if verb == 'X' => format!("{u:X}"),
            16 => format!("{u:x}"),
            _ => u.to_string(),
        };
        if digits.len() < prec {
            digits = format!("{}{digits}", "0".repeat(prec - digits.len()));
        }
        if self.flags.sharp {
            match base {
                2 => digits.insert_str(0, "0b"),
                8 if !digits.starts_with('0') => digits.insert(0, '0'),
                16 => digits.insert_str(0, if verb == 'X' { "0X" } else { "0x" }),
                _ => {}
            }
        }
        if verb == 'O' {
            digits.insert_str(0, "0o");
        }
        if negative {
            digits.insert(0, '-');
        } else if self.flags.plus {
            digits.insert(0, '+');
        } else if self.flags.space {
            digits.insert(0, ' ');
        }
        self.pad_spaces(&digits);
    }

    fn float(&mut self, x: f64, verb: char, v: &Val) {
        let (kind, default_prec) = match verb {
            'v' => ('g', None),
            'g' | 'G' | 'x' | 'X' | 'b' => (verb, None),
            'e' | 'E' | 'f' | 'F' => (verb, Some(6)),
            _ => return self.bad_verb(verb, v),
        };
        let prec = self.flags.prec.or(default_prec);
        let body = format_float(x.abs(), kind, prec);
        let sign = if x.is_sign_negative() && !x.is_nan() {
            '-'
        } else if self.flags.plus {
            '+'
        } else if self.flags.space {
            ' '
        } else {
            '\0'
        };
        if x.is_infinite() || x.is_nan() {
            // Go keeps the sign of an infinity ("+Inf") and shows NaN's only when asked for.
            let sign = match (
                x.is_nan(),
                x.is_sign_negative(),
                self.flags.plus,
                self.flags.space,
            ) {
                (false, true, _, _) => "-",
                (_, _, true, _) => "+",
                (_, _, false, true) => " ",
                (false, _, _, _) => "+",
                _ => "",
            };
            self.pad_spaces(&format!("{sign}{body}"));
            return;
        }
        if sign == '\0' {
            self.pad(&body);
            return;
        }
        let len = body.chars().count() + 1;
        match self.flags.wid {
            Some(w) if self.flags.zero && !self.flags.minus && w > len => {
                self.out.push(sign);
                self.out.extend(std::iter::repeat_n('0', w - len));
                self.out.push_str(&body);
            }
            _ => self.pad(&format!("{sign}{body}")),
        }
    }
}

/// `strconv.FormatFloat(x, kind, prec, 64)` of a non-negative `x`; `prec` None is shortest.
pub fn format_float(x: f64, kind: char, prec: Option<usize>) -> String {
    if x.is_infinite() {
        return "Inf".into();
    }
    if x.is_nan() {
        return "NaN".into();
    }
    if kind == 'b' {
        return binary_float(x);
    }
    if kind == 'x' || kind == 'X' {
        return hex_float(x, kind == 'X');
    }
    let upper = kind.is_ascii_uppercase();
    let e = if upper { 'E' } else { 'e' };
    let exp_form = |mantissa: &str, exp: i32| {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}{e}{sign}{:02}", exp.abs())
    };
    let sci = |p: Option<usize>| -> (String, i32) {
        let s = match p {
            Some(p) => format!("{x:.p$e}"),
            None => format!("{x:e}"),
        };
        let (m, ex) = s.split_once('e').expect("{:e} has an exponent");
        (m.to_string(), ex.parse().expect("an integer exponent"))
    };
    match kind.to_ascii_lowercase() {
        'e' => {
            let (m, ex) = sci(prec);
            exp_form(&m, ex)
        }
        'f' => match prec {
            Some(p) => format!("{x:.p$}"),
            None => format!("{x}"),
        },
        _ => {
            // %g: the shortest digits, or `prec` significant ones, then %e when the exponent
            // is below -4 or at least the precision (6 for the shortest form).
            if x == 0.0 {
                return "0".into();
            }
            let (m, ex) = sci(prec.map(|p| p.max(1) - 1));
            let m = if m.contains('.') {
                m.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                m
            };
            let digits = m.chars().filter(char::is_ascii_digit).count() as i32;
            let eprec = match prec {
                None => 6,
                Some(p) if (p as i32) > digits && digits > ex => digits,
                Some(p) => p.max(1) as i32,
            };
            if ex < -4 || ex >= eprec {
                exp_form(&m, ex)
            } else {
                let after = (digits - 1 - ex).max(0) as usize;
                format!("{x:.after$}")
            }
        }
    }
}

/// `strconv.FormatFloat(x, 'b', -1, 64)`: the integer mantissa and the binary exponent.
fn binary_float(x: f64) -> String {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64;
    let mut mant = bits & ((1 << 52) - 1);
    let exp = if exp == 0 {
        -1074
    } else {
        mant |= 1 << 52;
        exp - 1075
    };
    let sign = if exp < 0 { "" } else { "+" };
    format!("{mant}p{sign}{exp}")
}

/// `strconv.FormatFloat(x, 'x', -1, 64)`: `0x1.cp+01`, the shortest hex mantissa.
fn hex_float(x: f64, upper: bool) -> String {
    let text = if x == 0.0 {
        "0x0p+00".to_string()
    } else {
        let bits = x.to_bits();
        let raw_exp = ((bits >> 52) & 0x7ff) as i64;
        let mut mant = bits & ((1 << 52) - 1);
        let mut exp = raw_exp - 1023;
        if raw_exp == 0 {
            // Subnormal: shift up to a leading 1.
            exp = -1022;
            while mant & (1 << 52) == 0 {
                mant <<= 1;
                exp -= 1;
            }
            mant &= (1 << 52) - 1;
        }
        let frac = format!("{mant:013x}");
        let frac = frac.trim_end_matches('0');
        let sign = if exp < 0 { '-' } else { '+' };
        let dot = if frac.is_empty() { "" } else { "." };
        format!("0x1{dot}{frac}p{sign}{:02}", exp.abs())
    };
    if upper { text.to_uppercase() } else { text }
}

/// `strconv.CanBackquote`.
fn can_backquote(s: &str) -> bool {
    s.chars()
        .all(|c| c != '`' && c != '\u{feff}' && (c == '\t' || !(c < ' ' || c == '\u{7f}')))
}

/// `strconv.Quote` (or `QuoteToASCII` with `ascii`, `QuoteRune` with `'`).
pub fn quote(s: &str, q: char, ascii: bool) -> String {
    let mut out = String::new();
    out.push(q);
    for c in s.chars() {
        if c == q || c == '\\' {
            out.push('\\');
            out.push(c);
            continue;
        }
        if ascii {
            if (c as u32) < 0x80 && go_printable(c) {
                out.push(c);
                continue;
            }
        } else if go_printable(c) {
            out.push(c);
            continue;
        }
        match c {
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(q);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Val {
        Val::from(x)
    }
    fn ints(n: &[i64]) -> Vec<Val> {
        n.iter().copied().map(Val::Int).collect()
    }
    fn reals(n: &[f64]) -> Vec<Val> {
        n.iter().copied().map(Val::Float).collect()
    }
    fn f(format: &str, args: &[Val]) -> String {
        sprintf(format, args).unwrap()
    }

    #[test]
    fn integers() {
        let ten = Val::Int(10);
        assert_eq!(
            f(
                "%b %o %O %x %X %#x %#o %c %q %U %#U",
                &[
                    ten.clone(),
                    ten.clone(),
                    ten,
                    Val::Int(255),
                    Val::Int(255),
                    Val::Int(255),
                    Val::Int(8),
                    Val::Int(65),
                    Val::Int(65),
                    Val::Int(65),
                    Val::Int(65)
                ]
            ),
            "1010 12 0o12 ff FF 0xff 010 A 'A' U+0041 U+0041 'A'"
        );
        assert_eq!(
            f(
                "%+d|% d|%05d|%-5d|%.3d|%8.3d|%+08d|%x",
                &ints(&[5, 5, -42, 7, 7, 7, 42, -255])
            ),
            "+5| 5|-0042|7    |007|     007|+0000042|-ff"
        );
    }

    #[test]
    fn floats() {
        assert_eq!(
            f(
                "%+.2e|%E|%G|%g|%.3g|%10.2f|%-10.2f|%+f|%08.3f",
                &reals(&[
                    12345.678,
                    1.5,
                    1e-7,
                    123456789.0,
                    3.14158,
                    3.14158,
                    2.5,
                    1.0,
                    -3.14158
                ])
            ),
            "+1.23e+04|1.500000E+00|1E-07|1.23456789e+08|3.14|      3.14|2.50      |+1.000000|-003.142"
        );
        assert_eq!(
            f(
                "%.3v %10.4v %.0f %.0f",
                &reals(&[3.14158, 2.71829, 0.5, 1.5])
            ),
            "3.14      2.718 0 2"
        );
    }

    #[test]
    fn strings_and_lists() {
        assert_eq!(
            f(
                "%x|% x|%#x|% X|%q|%+q|%#q|%.2s|%5.1s|%-4s|",
                &[
                    s("hi"),
                    s("hi"),
                    s("hi"),
                    s("hé"),
                    s("é\t\""),
                    s("é"),
                    s("b`q"),
                    s("héllo"),
                    s("xyz"),
                    s("a")
                ]
            ),
            "6869|68 69|0x6869|68 C3 A9|\"é\\t\\\"\"|\"\\u00e9\"|\"b`q\"|hé|    x|a   |"
        );
        let list = Val::List(std::rc::Rc::new(vec![
            Val::Number("1".into()),
            s("two"),
            Val::Bool(true),
        ]));
        assert_eq!(
            f(
                "%d|%s|%5v|%x|%q|%#v",
                &[
                    list.clone(),
                    list.clone(),
                    list.clone(),
                    list.clone(),
                    list.clone(),
                    list
                ]
            ),
            "[%!d(json.Number=1) %!d(string=two) %!d(bool=true)]|[1 two %!s(bool=true)]|[    1   two  true]|[31 74776f %!x(bool=true)]|[\"1\" \"two\" %!q(bool=true)]|[]interface {}{\"1\", \"two\", true}"
        );
    }

    #[test]
    fn indexes_stars_and_errors() {
        let args = [
            Val::Int(5),
            Val::Int(42),
            Val::Int(3),
            Val::Int(7),
            Val::Int(2),
            Val::Float(3.14158),
        ];
        assert_eq!(f("%*d|%-*d|%.*f|%[2]d %[1]d", &args), "   42|7  |3.14|42 5");
        assert_eq!(
            f(
                "%[5]d|%[0]d|%[x]d|%!|%z|%t|%t",
                &[Val::Int(1), Val::Int(2), Val::Bool(true), Val::Int(3)]
            ),
            "%!d(BADINDEX)|%!d(BADINDEX)|%!d(BADINDEX)|%!!(int=1)|%!z(int=2)|true|%!t(int=3)"
        );
        assert_eq!(
            f("%v %d|%5d|%.2f", &[Val::Nil, Val::Nil, s("x"), Val::Int(3)]),
            "<nil> %!d(<nil>)|%!d(string=    x)|%!f(int=03)"
        );
        assert_eq!(f("%s %s", &[s("a")]), "a %!s(MISSING)");
        assert_eq!(f("%s", &[s("a"), Val::Int(2)]), "a%!(EXTRA int=2)");
        assert_eq!(
            f("%99999999d|", &[Val::Int(1)]),
            "%!(NOVERB)%!(EXTRA int=1)"
        );
    }
}
