//! JSON strings the way RoadRunner writes them: Go's `encoding/json`
//! (RoadRunner uses goccy/go-json, which keeps its output), so that a
//! RoadRunner client reads from wsgate the bytes it read from RoadRunner.
//!
//! Go escapes `<`, `>` and `&` (`\u003c` `\u003e` `\u0026`, safe inside
//! HTML), U+2028 and U+2029, every control character (`\n` `\r` `\t` by
//! name, the others as `\u00XX` with lowercase hex, as Go 1.19 did), and
//! writes `\ufffd` for each byte that is not part of valid UTF-8.

/// Appends `bytes` as a JSON string in Go's encoding.
pub fn push_str(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        let mut start = 0;
        for (i, c) in valid.char_indices() {
            let escape: Option<&str> = match c {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                '\u{2028}' => Some("\\u2028"),
                '\u{2029}' => Some("\\u2029"),
                c if c < ' ' || matches!(c, '<' | '>' | '&') => None,
                _ => continue,
            };
            out.push_str(&valid[start..i]);
            start = i + c.len_utf8();
            match escape {
                Some(e) => out.push_str(e),
                None => {
                    let b = c as u8;
                    out.push_str("\\u00");
                    out.push(char::from(HEX[usize::from(b >> 4)]));
                    out.push(char::from(HEX[usize::from(b & 0xf)]));
                }
            }
        }
        out.push_str(&valid[start..]);
        for _ in chunk.invalid() {
            out.push_str("\\ufffd");
        }
    }
    out.push('"');
}

/// `bytes` as a JSON string in Go's encoding.
pub fn string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    push_str(&mut out, bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::string;

    #[test]
    fn escapes_as_go_does() {
        assert_eq!(string(b"plain"), r#""plain""#);
        assert_eq!(
            string(b"<b>&</b>"),
            r#""\u003cb\u003e\u0026\u003c/b\u003e""#
        );
        assert_eq!(string(b"q\"b\\"), r#""q\"b\\""#);
        assert_eq!(
            string(b"\n\r\t\x08\x0c\x00\x1f\x7f"),
            "\"\\n\\r\\t\\u0008\\u000c\\u0000\\u001f\x7f\""
        );
        assert_eq!(
            string("a\u{2028}b\u{2029}".as_bytes()),
            r#""a\u2028b\u2029""#
        );
        assert_eq!(string("é€😀".as_bytes()), "\"é€😀\"");
        // One replacement per invalid byte, as Go's decoder reads them.
        assert_eq!(string(b"a\xffb"), r#""a\ufffdb""#);
        assert_eq!(string(b"\xe2\x82A"), r#""\ufffd\ufffdA""#);
        assert_eq!(string(b"{\"x\":1}"), r#""{\"x\":1}""#);
    }

    #[test]
    fn whatever_the_bytes_the_result_is_json_for_their_text() {
        let cases: [&[u8]; 4] = [b"\x00\x01<>&", b"\xc3", "\u{2028}x".as_bytes(), b"\\u0000"];
        for bytes in cases {
            let parsed: String = serde_json::from_str(&string(bytes)).unwrap_or_default();
            assert_eq!(parsed, String::from_utf8_lossy(bytes));
        }
    }
}
