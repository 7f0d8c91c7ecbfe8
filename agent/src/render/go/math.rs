//! consul-template's arithmetic: `add`, `subtract`, `multiply`, `divide`, `modulo`, `minimum`,
//! `maximum`. The piped value comes last, so `{{ 10 | subtract 2 }}` is 10 - 2; two ints give an
//! int, a float on either side a float, as in consul-template.

use super::exec::Val;

pub const NAMES: &[&str] = &[
    "add", "subtract", "multiply", "divide", "modulo", "minimum", "maximum",
];

/// `name b a`: the operation on `a` (the last argument) and `b`.
pub fn call(name: &str, args: &[Val]) -> Result<Val, String> {
    let [b, a] = args else {
        return Err(format!(
            "wrong number of args for {name}: want 2 got {}",
            args.len()
        ));
    };
    let num = |v: &Val| -> Result<Num, String> {
        match v {
            Val::Int(n) => Ok(Num::Int(*n)),
            Val::Float(f) => Ok(Num::Float(*f)),
            other => Err(format!(
                "{name}: unknown type for {:?} ({})",
                super::exec::print(other),
                other.type_name()
            )),
        }
    };
    Ok(match (num(a)?, num(b)?) {
        (Num::Int(a), Num::Int(b)) => Val::Int(int_op(name, a, b)?),
        // A float on either side makes the result a float.
        (a, b) => Val::Float(float_op(name, a.float(), b.float())?),
    })
}

enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn float(&self) -> f64 {
        match self {
            Num::Int(n) => *n as f64,
            Num::Float(f) => *f,
        }
    }
}

fn int_op(name: &str, a: i64, b: i64) -> Result<i64, String> {
    let divide_by_zero = || "runtime error: integer divide by zero".to_string();
    Ok(match name {
        "add" => a.wrapping_add(b),
        "subtract" => a.wrapping_sub(b),
        "multiply" => a.wrapping_mul(b),
        "divide" => a.checked_div(b).ok_or_else(divide_by_zero)?,
        "modulo" => a.checked_rem(b).ok_or_else(divide_by_zero)?,
        "minimum" => a.min(b),
        _ => a.max(b),
    })
}

fn float_op(name: &str, a: f64, b: f64) -> Result<f64, String> {
    Ok(match name {
        "add" => a + b,
        "subtract" => a - b,
        "multiply" => a * b,
        "divide" => a / b,
        "modulo" => return Err("modulo: unknown type for float64 operands".into()),
        "minimum" => a.min(b),
        _ => a.max(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_in_consul_template_order() {
        let run = |name: &str, b: Val, a: Val| call(name, &[b, a]);
        assert_eq!(run("subtract", Val::Int(2), Val::Int(5)), Ok(Val::Int(3)));
        assert_eq!(run("divide", Val::Int(2), Val::Int(10)), Ok(Val::Int(5)));
        assert_eq!(run("modulo", Val::Int(3), Val::Int(10)), Ok(Val::Int(1)));
        assert_eq!(
            run("add", Val::Float(1.5), Val::Int(2)),
            Ok(Val::Float(3.5))
        );
        assert_eq!(
            run("add", Val::Int(2), Val::Float(1.5)),
            Ok(Val::Float(3.5))
        );
        assert_eq!(run("minimum", Val::Int(3), Val::Int(5)), Ok(Val::Int(3)));
        assert_eq!(
            run("divide", Val::Int(0), Val::Int(1)).unwrap_err(),
            "runtime error: integer divide by zero"
        );
        assert_eq!(
            run("add", Val::Number("8080".into()), Val::Int(1)).unwrap_err(),
            "add: unknown type for \"8080\" (json.Number)"
        );
    }
}
