//! Lists and maps: Go's `slice` and consul-template's `in`/`contains` family, `loop`,
//! `splitToMap` and `explodeMap`.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::exec::Val;

/// consul-template's `in(l, v)`: a list holds an element of the same type and value (a
/// json.Number is not an int, nor a string), or a string holds the substring.
pub fn contained(l: &Val, v: &Val) -> bool {
    match l {
        Val::List(items) | Val::Strings(items) => items.iter().any(|i| match (i, v) {
            (Val::Int(a), Val::Int(b)) => a == b,
            (Val::Float(a), Val::Float(b)) => a == b,
            (Val::Str(a), Val::Str(b)) | (Val::Number(a), Val::Number(b)) => a == b,
            _ => false,
        }),
        Val::Str(s) => matches!(v, Val::Str(x) if s.contains(x.as_str())),
        Val::Number(s) => matches!(v, Val::Number(x) if s.contains(x.as_str())),
        _ => false,
    }
}

/// `containsAll`, `containsAny`, `containsNone`, `containsNotAll` of `wanted` in `l`.
pub fn contains_some(name: &str, wanted: &Val, l: &Val) -> Result<bool, String> {
    let Val::List(wanted) = wanted else {
        return Err(format!(
            "wrong type for value; expected []interface {{}}; got {}",
            wanted.type_name()
        ));
    };
    let found = |v: &Val| contained(l, v);
    Ok(match name {
        "containsAll" => wanted.iter().all(found),
        "containsAny" => wanted.iter().any(found),
        "containsNone" => !wanted.iter().any(found),
        _ => !wanted.iter().all(found),
    })
}

fn int_of(name: &str, v: &Val) -> Result<i64, String> {
    match v {
        Val::Int(n) => Ok(*n),
        Val::Str(s) | Val::Number(s) => s.parse().map_err(|_| {
            format!(
                "{name}: strconv.ParseInt: parsing {}: invalid syntax",
                super::funcs::withheld(s)
            )
        }),
        Val::Float(f) => Ok(*f as i64),
        other => Err(format!("{name}: unknown type {}", other.type_name())),
    }
}

/// `loop n` (0 to n-1) or `loop start stop` (start to stop-1), as a list to range over; the
/// caller bounds its length.
pub fn loop_bounds(args: &[Val]) -> Result<(i64, i64), String> {
    match args {
        [stop] => Ok((0, int_of("loop", stop)?)),
        [start, stop] => Ok((int_of("loop", start)?, int_of("loop", stop)?)),
        _ => Err(format!(
            "loop: wrong number of arguments, expected 1 or 2, but got {}",
            args.len()
        )),
    }
}

/// Go's `slice x i j k`: bytes of a string (a cut through a character gives binary bytes), or
/// elements of a list.
pub fn slice(args: &[Val]) -> Result<Val, String> {
    let Some((item, idx)) = args.split_first() else {
        return Err("wrong number of args for slice: want at least 1 got 0".into());
    };
    let len = match item {
        Val::Str(s) | Val::Number(s) => s.len(),
        Val::Bytes(b) => b.len(),
        Val::List(l) | Val::Strings(l) => l.len(),
        Val::NoValue | Val::Nil => return Err("slice of untyped nil".into()),
        other => return Err(format!("can't slice item of type {}", other.type_name())),
    };
    let is_list = matches!(item, Val::List(_) | Val::Strings(_));
    if idx.len() > 3 || (idx.len() == 3 && !is_list) {
        return Err(format!("too many slice indexes: {}", idx.len()));
    }
    let mut bounds = Vec::with_capacity(idx.len());
    for i in idx {
        let Val::Int(n) = i else {
            return Err(format!(
                "cannot index slice/array with type {}",
                i.type_name()
            ));
        };
        let n = usize::try_from(*n).map_err(|_| format!("index out of range: {n}"))?;
        if n > len {
            return Err(format!("index out of range: {n}"));
        }
        bounds.push(n);
    }
    let start = bounds.first().copied().unwrap_or(0);
    let end = bounds.get(1).copied().unwrap_or(len);
    if start > end {
        return Err(format!("invalid slice index: {start} > {end}"));
    }
    if let Some(&cap) = bounds.get(2)
        && end > cap
    {
        return Err(format!("invalid slice index: {end} > {cap}"));
    }
    Ok(match item {
        Val::List(l) => Val::List(Rc::new(l[start..end].to_vec())),
        Val::Strings(l) => Val::Strings(Rc::new(l[start..end].to_vec())),
        Val::Str(s) | Val::Number(s) => bytes_to_val(s.as_bytes()[start..end].to_vec()),
        Val::Bytes(b) => bytes_to_val(b[start..end].to_vec()),
        _ => unreachable!("only strings and lists have a length here"),
    })
}

/// A Go string from bytes: text when it is UTF-8, binary bytes otherwise.
pub fn bytes_to_val(bytes: Vec<u8>) -> Val {
    match String::from_utf8(bytes) {
        Ok(s) => Val::Str(s),
        Err(e) => Val::Bytes(Rc::new(e.into_bytes())),
    }
}

/// Go's `strings.Split`: an empty separator splits after each character.
pub fn go_split<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    if sep.is_empty() {
        s.char_indices()
            .map(|(i, c)| &s[i..i + c.len_utf8()])
            .collect()
    } else {
        s.split(sep).collect()
    }
}

/// `splitToMap sep kvsep s`: `a=1,b=2` → map[a:1 b:2]; an item without `kvsep` is left out.
pub fn split_to_map(sep: &str, kvsep: &str, s: &str) -> Val {
    let mut map = BTreeMap::new();
    if !s.is_empty() {
        for item in go_split(s, sep) {
            if let Some((k, v)) = item.split_once(kvsep).filter(|_| !kvsep.is_empty()) {
                map.insert(k.to_string(), Val::Str(v.to_string()));
            }
        }
    }
    Val::Map(Rc::new(map))
}

/// `explodeMap`: keys with `/` become nested maps (`a/b` → map[a:map[b:…]]).
pub fn explode_map(v: &Val) -> Result<Val, String> {
    let Val::Map(flat) = v else {
        return Err(format!(
            "wrong type for value; expected map[string]interface {{}}; got {}",
            v.type_name()
        ));
    };
    let mut root = BTreeMap::new();
    for (key, value) in flat.iter() {
        insert(&mut root, key, key, value.clone())?;
    }
    Ok(Val::Map(Rc::new(root)))
}

fn insert(
    map: &mut BTreeMap<String, Val>,
    full: &str,
    key: &str,
    value: Val,
) -> Result<(), String> {
    let Some((head, rest)) = key.split_once('/') else {
        if map.contains_key(key) {
            return Err(format!(
                "explodeMap: not a map: {full:?}: {key:?} already has a value"
            ));
        }
        map.insert(key.to_string(), value);
        return Ok(());
    };
    let slot = map
        .entry(head.to_string())
        .or_insert_with(|| Val::Map(Rc::new(BTreeMap::new())));
    let Val::Map(inner) = slot else {
        return Err(format!(
            "explodeMap: not a map: {full:?}: {head:?} already has value {:?}",
            super::exec::print(slot)
        ));
    };
    insert(Rc::make_mut(inner), full, rest, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[Val]) -> Val {
        Val::List(Rc::new(items.to_vec()))
    }
    fn s(x: &str) -> Val {
        Val::from(x)
    }

    #[test]
    fn membership_needs_the_same_type() {
        let l = list(&[s("a"), Val::Number("1".into())]);
        assert!(contained(&l, &s("a")));
        assert!(!contained(&l, &Val::Int(1)));
        assert!(contained(&s("abc"), &s("b")));
        for (name, want) in [
            ("containsAll", false),
            ("containsAny", true),
            ("containsNone", false),
            ("containsNotAll", true),
        ] {
            assert_eq!(
                contains_some(name, &list(&[s("a"), s("z")]), &l),
                Ok(want),
                "{name}"
            );
        }
        assert_eq!(contains_some("containsAll", &list(&[]), &l), Ok(true));
    }

    #[test]
    fn slices_and_loops() {
        assert_eq!(slice(&[s("abcdef"), Val::Int(1), Val::Int(3)]), Ok(s("bc")));
        assert_eq!(
            slice(&[s("héllo"), Val::Int(1), Val::Int(2)]),
            Ok(Val::Bytes(Rc::new(vec![0xc3])))
        );
        assert_eq!(
            slice(&[s("abc"), Val::Int(1), Val::Int(5)]).unwrap_err(),
            "index out of range: 5"
        );
        assert_eq!(loop_bounds(&[Val::Int(3)]), Ok((0, 3)));
        assert_eq!(loop_bounds(&[s("2"), Val::Int(5)]), Ok((2, 5)));
    }

    #[test]
    fn maps_from_text_and_paths() {
        assert_eq!(
            super::super::exec::print(&split_to_map(",", "=", "a=1,b,c=3=4")),
            "map[a:1 c:3=4]"
        );
        let flat = Val::Map(Rc::new(BTreeMap::from([
            ("a/b".to_string(), s("1")),
            ("a/c".to_string(), Val::Number("2".into())),
            ("x//y".to_string(), s("5")),
        ])));
        assert_eq!(
            super::super::exec::print(&explode_map(&flat).unwrap()),
            "map[a:map[b:1 c:2] x:map[:map[y:5]]]"
        );
        let clash = Val::Map(Rc::new(BTreeMap::from([
            ("a".to_string(), s("x")),
            ("a/b".to_string(), s("1")),
        ])));
        assert_eq!(
            explode_map(&clash).unwrap_err(),
            "explodeMap: not a map: \"a/b\": \"a\" already has value \"x\""
        );
    }
}
