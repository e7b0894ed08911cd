//! The SocketStream 0.4 (Prism) frame: `<serviceId>|[<callbackId>|]<payload>`.
//!
//! Split on the first separator, and for a service with callbacks on the
//! second: pipes inside the payload are the payload's. Prism throws on a
//! frame it cannot place (an unknown service id, no callback slot); here
//! each is a [`FrameError`], answered on the system service.

/// wsgate's services, in their fixed order (their ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// 0: `connect` and `discover` (JSON, callbacks).
    System,
    /// 1: remote procedure calls (JSON, callbacks).
    Rpc,
    /// 2: server pushes (JSON, no callbacks).
    PubSub,
}

impl Service {
    /// The id on the wire.
    pub fn id(self) -> u8 {
        match self {
            Service::System => 0,
            Service::Rpc => 1,
            Service::PubSub => 2,
        }
    }

    /// The name `discover` lists.
    pub fn name(self) -> &'static str {
        match self {
            Service::System => "_system",
            Service::Rpc => "rpc",
            Service::PubSub => "pubsub",
        }
    }

    /// Whether its frames carry a callback slot.
    pub fn callbacks(self) -> bool {
        !matches!(self, Service::PubSub)
    }
}

/// One frame, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Which service it is for.
    pub service: Service,
    /// The callback id; `None` for a service without callbacks, or an empty
    /// slot (a message the client wants no answer to).
    pub callback: Option<u64>,
    /// The rest of the frame.
    pub payload: &'a str,
}

/// Why a frame cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// No `|` at all.
    NoSeparator,
    /// A service id wsgate does not have.
    UnknownService(String),
    /// A callback service's frame without the slot.
    MissingCallback(Service),
    /// A slot that is not a positive whole number.
    BadCallback(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::NoSeparator => {
                f.write_str("malformed frame: expected <serviceId>|[<callbackId>|]<payload>")
            }
            FrameError::UnknownService(id) => {
                write!(
                    f,
                    "unknown service id {id:?}: expected 0 (system), 1 (rpc) or 2 (pubsub)"
                )
            }
            FrameError::MissingCallback(s) => write!(
                f,
                "service {} ({}) needs a callback slot: {}|<callbackId>|<payload>",
                s.id(),
                s.name(),
                s.id()
            ),
            FrameError::BadCallback(cb) => {
                write!(
                    f,
                    "invalid callback id {cb:?}: expected a positive whole number"
                )
            }
        }
    }
}

/// Longest callback id accepted, in digits (JavaScript counts exactly up to 2^53).
const MAX_CALLBACK_DIGITS: usize = 15;

/// Splits one frame.
pub fn parse(text: &str) -> Result<Message<'_>, FrameError> {
    let (id, rest) = text.split_once('|').ok_or(FrameError::NoSeparator)?;
    let service = match id {
        "0" => Service::System,
        "1" => Service::Rpc,
        "2" => Service::PubSub,
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(FrameError::UnknownService(shown));
        }
    };
    if !service.callbacks() {
        return Ok(Message {
            service,
            callback: None,
            payload: rest,
        });
    }
    let (slot, payload) = rest
        .split_once('|')
        .ok_or(FrameError::MissingCallback(service))?;
    let callback = match slot {
        "" => None,
        digits
            if digits.len() <= MAX_CALLBACK_DIGITS
                && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match digits.parse::<u64>() {
                Ok(0) | Err(_) => return Err(FrameError::BadCallback(digits.to_owned())),
                Ok(n) => Some(n),
            }
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(FrameError::BadCallback(shown));
        }
    };
    Ok(Message {
        service,
        callback,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_the_first_separators_only() {
        assert_eq!(
            parse(r#"1|7|{"m":"a|b","p":["|"]}"#),
            Ok(Message {
                service: Service::Rpc,
                callback: Some(7),
                payload: r#"{"m":"a|b","p":["|"]}"#
            })
        );
        assert_eq!(
            parse("2|x|y"),
            Ok(Message {
                service: Service::PubSub,
                callback: None,
                payload: "x|y"
            })
        );
        assert_eq!(
            parse("0||{}"),
            Ok(Message {
                service: Service::System,
                callback: None,
                payload: "{}"
            })
        );
    }

    #[test]
    fn refuses_what_it_cannot_place() {
        assert_eq!(parse("hello"), Err(FrameError::NoSeparator));
        assert_eq!(parse(""), Err(FrameError::NoSeparator));
        assert_eq!(parse("3|1|{}"), Err(FrameError::UnknownService("3".into())));
        assert_eq!(parse("|{}"), Err(FrameError::UnknownService("".into())));
        assert_eq!(
            parse("01|1|{}"),
            Err(FrameError::UnknownService("01".into()))
        );
        assert_eq!(
            parse("1|{}"),
            Err(FrameError::MissingCallback(Service::Rpc))
        );
        assert_eq!(parse("0|x|{}"), Err(FrameError::BadCallback("x".into())));
        assert_eq!(parse("0|0|{}"), Err(FrameError::BadCallback("0".into())));
        assert_eq!(
            parse("0|1234567890123456|{}"),
            Err(FrameError::BadCallback("1234567890123456".into()))
        );
        assert_eq!(
            FrameError::MissingCallback(Service::Rpc).to_string(),
            "service 1 (rpc) needs a callback slot: 1|<callbackId>|<payload>"
        );
    }
}
