//! Kubernetes resource quantities ("250m", "64Mi", "1.5Gi", "2e3") read as exact amounts, so an
//! agent's request and limit can be compared before the pod reaches the API server, which
//! rejects a request above its limit with a message that does not name the annotation.

use std::cmp::Ordering;

/// An amount `mantissa × 10^exp10 × 2^exp2`, exact for every quantity Kubernetes accepts.
#[derive(Debug, Clone, Copy)]
pub struct Amount {
    mantissa: u128,
    exp10: i32,
    exp2: u32,
}

/// The most significant decimal digits kept; u128 holds 38.
const MAX_DIGITS: usize = 30;

/// Reads a quantity, or None when it is not one (`is_quantity` says the same).
pub fn parse(text: &str) -> Option<Amount> {
    let q = text.strip_prefix('+').unwrap_or(text);
    let number_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    // Digits beyond what u128 holds only move the amount by less than one part in 10^30.
    let kept = &digits[..digits.len().min(MAX_DIGITS)];
    let dropped = i32::try_from(digits.len() - kept.len()).ok()?;
    let mantissa = if kept.is_empty() {
        0
    } else {
        kept.parse::<u128>().ok()?
    };
    let fraction_len = i32::try_from(fraction.len()).ok()?;
    let (exp10, exp2) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        other => {
            let exponent = other.strip_prefix(['e', 'E'])?;
            let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Kubernetes caps exponents far below this; a longer one is not a quantity.
            (
                exponent.parse::<i32>().ok().filter(|e| e.abs() < 10_000)?,
                0,
            )
        }
    };
    Some(Amount {
        mantissa,
        exp10: exp10 - fraction_len + dropped,
        exp2,
    })
}

impl PartialEq for Amount {
    fn eq(&self, other: &Amount) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Amount {}

impl PartialOrd for Amount {
    fn partial_cmp(&self, other: &Amount) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Amount {
    /// Compares two amounts exactly when their common scale fits in u128, and by their
    /// logarithms (which differ by far more than rounding whenever that scale does not fit)
    /// otherwise.
    fn cmp(&self, other: &Amount) -> Ordering {
        match (self.mantissa, other.mantissa) {
            (0, 0) => return Ordering::Equal,
            (0, _) => return Ordering::Less,
            (_, 0) => return Ordering::Greater,
            _ => {}
        }
        let exp10 = self.exp10.min(other.exp10);
        let exp2 = self.exp2.min(other.exp2);
        let scaled = |a: &Amount| {
            let by10 = 10u128.checked_pow(u32::try_from(a.exp10 - exp10).ok()?)?;
            let by2 = 1u128.checked_shl(a.exp2 - exp2)?;
            a.mantissa.checked_mul(by10)?.checked_mul(by2)
        };
        match (scaled(self), scaled(other)) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self.log10().total_cmp(&other.log10()),
        }
    }
}

impl Amount {
    fn log10(&self) -> f64 {
        (self.mantissa as f64).log10()
            + f64::from(self.exp10)
            + f64::from(self.exp2) * std::f64::consts::LOG10_2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str) -> Ordering {
        parse(a)
            .unwrap_or_else(|| panic!("{a}"))
            .cmp(&parse(b).unwrap_or_else(|| panic!("{b}")))
    }

    #[test]
    fn forms_compare_by_amount() {
        use Ordering::*;
        for (a, b, want) in [
            ("256Mi", "64Mi", Greater),
            ("16Mi", "8Mi", Greater),
            ("64Mi", "64Mi", Equal),
            ("1Gi", "1024Mi", Equal),
            ("1G", "1Gi", Less),
            ("64M", "62Mi", Less),
            ("64M", "61Mi", Greater),
            ("67108864", "64Mi", Equal),
            ("67108865", "64Mi", Greater),
            ("100m", "0.1", Equal),
            ("250m", "0.25", Equal),
            ("1", "999m", Greater),
            ("2e3", "2k", Equal),
            ("1E-3", "1m", Equal),
            ("0.5Gi", "512Mi", Equal),
            ("+1", "1000m", Equal),
            ("0", "1n", Less),
            ("000", "0.0", Equal),
            ("1Ei", "1E", Greater),
            ("1e100", "1Ei", Greater),
            ("1e-100", "1n", Less),
            ("123456789012345678901234567890123456789", "1e38", Greater),
        ] {
            assert_eq!(cmp(a, b), want, "{a} vs {b}");
            assert_eq!(cmp(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn non_quantities_are_refused() {
        for q in [
            "", "lots", "1.2.3", "-1", "64MB", "e3", "1e", ".", "1e99999",
        ] {
            assert!(parse(q).is_none(), "{q}");
        }
    }
}
