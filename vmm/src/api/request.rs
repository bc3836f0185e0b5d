//! Parsing API request lines: strict JSON, unknown ops and fields rejected.

use serde::Deserialize;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

fn default_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Unit-like ops are empty struct variants: serde's deny_unknown_fields only applies to
    // struct variants of an internally tagged enum.
    Ping {},
    SetDrive {
        id: String,
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        read_only: bool,
    },
    ClearDrive {
        id: String,
    },
    Pause {},
    Resume {},
    Stop {
        #[serde(default)]
        force: bool,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    Metrics {},
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("request line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub fn parse_request(line: &[u8]) -> Result<Request, Error> {
    if line.len() > MAX_LINE {
        return Err(Error::TooLong);
    }
    serde_json::from_slice(line).map_err(|e| Error::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        assert_eq!(parse_request(br#"{"op":"ping"}"#), Ok(Request::Ping {}));
        assert_eq!(
            parse_request(br#"{"op":"set_drive","id":"c1","read_only":true}"#),
            Ok(Request::SetDrive {
                id: "c1".into(),
                path: None,
                read_only: true
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"set_drive","id":"c1","path":"/x"}"#),
            Ok(Request::SetDrive {
                id: "c1".into(),
                path: Some("/x".into()),
                read_only: false
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"clear_drive","id":"c1"}"#),
            Ok(Request::ClearDrive { id: "c1".into() })
        );
        assert_eq!(parse_request(br#"{"op":"pause"}"#), Ok(Request::Pause {}));
        assert_eq!(parse_request(br#"{"op":"resume"}"#), Ok(Request::Resume {}));
        assert_eq!(
            parse_request(br#"{"op":"stop"}"#),
            Ok(Request::Stop {
                force: false,
                timeout_ms: 5000
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"stop","force":true,"timeout_ms":10}"#),
            Ok(Request::Stop {
                force: true,
                timeout_ms: 10
            })
        );
        assert_eq!(
            parse_request(br#"{"op":"metrics"}"#),
            Ok(Request::Metrics {})
        );
    }

    #[test]
    fn rejects_unknown_ops_fields_and_garbage() {
        assert!(parse_request(br#"{"op":"reboot"}"#).is_err());
        assert!(parse_request(br#"{"op":"ping","extra":1}"#).is_err());
        assert!(parse_request(br#"{"op":"set_drive"}"#).is_err());
        assert!(parse_request(br#"{"op":"stop","force":"yes"}"#).is_err());
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(b"").is_err());
        assert!(parse_request(&[0xff, 0xfe]).is_err());
        assert_eq!(
            parse_request(&vec![b' '; MAX_LINE + 1]),
            Err(Error::TooLong)
        );
    }
}
