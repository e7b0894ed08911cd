//! The client's `Sec-WebSocket-Extensions` offers (RFC 6455 section 9.1,
//! RFC 7692 section 7) and our answer.
//!
//! Parsing is strict: a header that does not follow the grammar means no
//! compression at all (never a refused handshake: the client still gets an
//! uncompressed socket). Within a well-formed header, a `permessage-deflate`
//! offer we cannot accept (an unknown or repeated parameter, a bad value)
//! is skipped and the next one is tried, as section 7 says.

use super::Agreed;

/// One extension offer: its name and parameters, values unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The extension token (`permessage-deflate`).
    pub name: String,
    /// Its parameters, in order; a value only where one was given.
    pub params: Vec<(String, Option<String>)>,
}

/// The header did not follow the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// RFC 7230's `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A cursor over the header's bytes.
struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn token(&mut self) -> Result<String, Malformed> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        if self.at == start {
            return Err(Malformed);
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    /// A quoted-string, unescaped; RFC 6455 section 9.1 wants a token
    /// inside.
    fn quoted(&mut self) -> Result<String, Malformed> {
        self.at += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.peek().ok_or(Malformed)? {
                b'"' => {
                    self.at += 1;
                    break;
                }
                b'\\' => {
                    self.at += 1;
                    out.push(self.peek().ok_or(Malformed)?);
                    self.at += 1;
                }
                b => {
                    out.push(b);
                    self.at += 1;
                }
            }
        }
        if out.is_empty() || !out.iter().copied().all(is_tchar) {
            return Err(Malformed);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Every offer of the header's values (several header lines are one list).
pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Offer>, Malformed> {
    let mut offers = Vec::new();
    for value in values {
        let mut c = Cursor { s: value, at: 0 };
        loop {
            c.ows();
            match c.peek() {
                None => break,
                // Empty list elements are ignored (RFC 7230 section 7).
                Some(b',') => {
                    c.at += 1;
                    continue;
                }
                Some(_) => {}
            }
            let name = c.token()?;
            let mut params = Vec::new();
            loop {
                c.ows();
                match c.peek() {
                    None => break,
                    Some(b',') => {
                        c.at += 1;
                        break;
                    }
                    Some(b';') => c.at += 1,
                    Some(_) => return Err(Malformed),
                }
                c.ows();
                let param = c.token()?;
                c.ows();
                let value = if c.peek() == Some(b'=') {
                    c.at += 1;
                    c.ows();
                    Some(if c.peek() == Some(b'"') {
                        c.quoted()?
                    } else {
                        c.token()?
                    })
                } else {
                    None
                };
                params.push((param, value));
            }
            offers.push(Offer { name, params });
        }
    }
    Ok(offers)
}

/// A window size as RFC 7692 section 7.1.2 writes it: 8 to 15, no leading
/// zero.
fn window_bits(value: &str) -> Option<u8> {
    match value {
        "8" | "9" | "10" | "11" | "12" | "13" | "14" | "15" => value.parse().ok(),
        _ => None,
    }
}

/// What we agree to a `permessage-deflate` offer, or `None` to decline it.
pub fn accept(offer: &Offer) -> Option<Agreed> {
    if offer.name != "permessage-deflate" {
        return None;
    }
    let mut agreed = Agreed { window_bits: 15 };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &offer.params {
        if seen.contains(&name.as_str()) {
            return None;
        }
        seen.push(name);
        match (name.as_str(), value.as_deref()) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => agreed.window_bits = window_bits(v)?,
            // A hint, or the client's own limit: our inflate window (32 KiB)
            // takes any.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window_bits(v)?;
            }
            _ => return None,
        }
    }
    Some(agreed)
}

/// The first offer of the header we accept, and the
/// `Sec-WebSocket-Extensions` value that answers it; `None` when there is
/// none (or the header is malformed).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<(Agreed, String)> {
    let offers = parse(values).ok()?;
    let agreed = offers.iter().find_map(accept)?;
    Some((agreed, answer(agreed)))
}

/// Our answer to an accepted offer.
pub fn answer(agreed: Agreed) -> String {
    let mut s =
        String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    if agreed.window_bits != 15 {
        s.push_str(&format!("; server_max_window_bits={}", agreed.window_bits));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(header: &str) -> Option<(Agreed, String)> {
        negotiate([header.as_bytes()])
    }

    const PLAIN: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn browsers_and_ws_offers_are_accepted() {
        let chrome = "permessage-deflate; client_max_window_bits";
        assert_eq!(
            neg(chrome),
            Some((Agreed { window_bits: 15 }, PLAIN.into()))
        );
        let ws = "permessage-deflate; client_max_window_bits=15";
        assert_eq!(neg(ws).map(|a| a.1), Some(PLAIN.into()));
        assert_eq!(neg("permessage-deflate").map(|a| a.1), Some(PLAIN.into()));
    }

    #[test]
    fn every_parameter_once_with_its_value_form() {
        let all = "permessage-deflate;server_no_context_takeover ; client_no_context_takeover;\
                   server_max_window_bits=\"10\"; client_max_window_bits=9";
        assert_eq!(
            neg(all),
            Some((
                Agreed { window_bits: 10 },
                format!("{PLAIN}; server_max_window_bits=10")
            ))
        );
    }

    #[test]
    fn offers_we_cannot_take_are_skipped() {
        for bad in [
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
            "x-webkit-deflate-frame",
            "Permessage-Deflate",
        ] {
            assert_eq!(neg(bad), None, "{bad}");
            let then = format!("{bad}, permessage-deflate; server_max_window_bits=12");
            assert_eq!(neg(&then).map(|a| a.0.window_bits), Some(12), "{then}");
        }
    }

    #[test]
    fn a_malformed_header_means_no_compression() {
        for bad in [
            "permessage-deflate; ",
            "permessage-deflate;; client_no_context_takeover",
            "permessage-deflate client_max_window_bits",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; client_max_window_bits=\"1,5\"",
            "permessage-deflate; client_max_window_bits=\"15",
            "permessage-deflate; client_max_window_bits=\"\"",
            "permessage-deflate, @",
            "=",
        ] {
            assert_eq!(neg(bad), None, "{bad}");
            // A good offer after a syntax error does not save it.
            assert_eq!(neg(&format!("{bad}, permessage-deflate")), None, "{bad}");
        }
    }

    #[test]
    fn lists_span_header_lines_and_skip_empty_elements() {
        let lines: [&[u8]; 2] = [b"foo; bar=1, ,", b" permessage-deflate"];
        assert_eq!(negotiate(lines).map(|a| a.1), Some(PLAIN.into()));
        assert_eq!(
            parse([b"a;b=\"c\\d\"".as_slice()]),
            Ok(vec![Offer {
                name: "a".into(),
                params: vec![("b".into(), Some("cd".into()))]
            }])
        );
        assert_eq!(neg(""), None);
    }
}
