//! The run-time API (vmm/CONTRACT.md): one JSON object per line in each direction on the Unix
//! socket given with `--api-sock`, every request answered by exactly one response line.

use serde::{Deserialize, Serialize};

use crate::limits::{DEFAULT_STOP_TIMEOUT_MS, MAX_LINE};
use crate::metrics::VmMetrics;

fn default_stop_timeout_ms() -> u64 {
    DEFAULT_STOP_TIMEOUT_MS
}

/// One request. Requests are untrusted: unknown ops and unknown fields are refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Unit-like ops are empty struct variants: serde's deny_unknown_fields only applies to
    // struct variants of an internally tagged enum.
    Ping {},
    /// Fills a drive slot: from `path` (resolved inside the jail) or, without a path, from the
    /// one fd passed with SCM_RIGHTS on the same message.
    SetDrive {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        #[serde(default)]
        read_only: bool,
    },
    /// Empties a drive slot (capacity 0).
    ClearDrive {
        id: String,
    },
    Pause {},
    Resume {},
    /// Graceful unless `force`: asks the guest to power off (vsock port
    /// [`POWER_PORT`](crate::limits::POWER_PORT)), waits up to `timeout_ms`, then forces.
    Stop {
        #[serde(default)]
        force: bool,
        #[serde(default = "default_stop_timeout_ms")]
        timeout_ms: u64,
    },
    Metrics {},
    /// Writes a snapshot of the paused VM into the directory `dir` (resolved inside the jail,
    /// like `set_drive`'s path; it must exist and be writable by the VMM's uid): the files
    /// `state` and `memory`. Refused unless the VM is paused.
    Snapshot {
        dir: String,
    },
}

impl Request {
    /// The op's name, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping {} => "ping",
            Request::SetDrive { .. } => "set_drive",
            Request::ClearDrive { .. } => "clear_drive",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Stop { .. } => "stop",
            Request::Metrics {} => "metrics",
            Request::Snapshot { .. } => "snapshot",
        }
    }

    /// The request line, newline included.
    pub fn to_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(self)?;
        line.push(b'\n');
        Ok(line)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_LINE {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice(line).map_err(|e| RequestError::Invalid(e.to_string()))
}

/// One response: `{"ok":true,...}` with the fields the op answers with, or
/// `{"ok":false,"error":"..."}`. One flat struct rather than one type per op, because the
/// wire format is flat and a client reads the field its op promises.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ping`: the VMM's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `set_drive`, `clear_drive`: the drive's new size in 512-byte sectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_sectors: Option<u64>,
    /// `stop`: whether the guest was asked to power off (false: forced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful: Option<bool>,
    /// `metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<VmMetrics>,
    /// `snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
}

/// What a `snapshot` wrote.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// The state file's size.
    pub state_bytes: u64,
    /// The memory file's length (the guest's RAM).
    pub memory_bytes: u64,
    /// Bytes of the memory file actually written (its non-zero pages; the rest are holes).
    pub memory_written_bytes: u64,
    /// Time from the request reaching the VMM thread to both files synced.
    pub duration_us: u64,
}

impl Response {
    /// `{"ok":true}`; set the op's field on it.
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    pub fn error(msg: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(msg.to_string()),
            ..Default::default()
        }
    }

    /// The response line, newline included.
    pub fn to_line(&self) -> String {
        // Serializing these plain fields cannot fail; a fallback keeps the one-line promise.
        let mut line = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"cannot encode the response"}"#.into());
        line.push('\n');
        line
    }
}

/// Why a response line is not a success.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ResponseError {
    /// The VMM refused the request; its message.
    #[error("{0}")]
    Refused(String),
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("response without \"ok\": {0}")]
    NoOk(String),
}

/// Reads one response line (without its newline): the response when `ok`, else why not.
pub fn parse_response(line: &[u8]) -> Result<Response, ResponseError> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| ResponseError::Malformed(e.to_string()))?;
    match value.get("ok").and_then(serde_json::Value::as_bool) {
        Some(true) => {
            serde_json::from_value(value).map_err(|e| ResponseError::Malformed(e.to_string()))
        }
        Some(false) => Err(ResponseError::Refused(
            value
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("error without a message")
                .to_string(),
        )),
        None => Err(ResponseError::NoOk(value.to_string())),
    }
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
        assert_eq!(
            parse_request(br#"{"op":"snapshot","dir":"/snap"}"#),
            Ok(Request::Snapshot {
                dir: "/snap".into()
            })
        );
        assert!(
            parse_request(br#"{"op":"snapshot"}"#).is_err(),
            "dir is required"
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
            Err(RequestError::TooLong)
        );
    }

    #[test]
    fn requests_read_back_as_themselves() {
        for r in [
            Request::Ping {},
            Request::SetDrive {
                id: "slot3".into(),
                path: None,
                read_only: true,
            },
            Request::ClearDrive { id: "slot0".into() },
            Request::Stop {
                force: false,
                timeout_ms: 7,
            },
            Request::Metrics {},
            Request::Snapshot {
                dir: "/snap".into(),
            },
        ] {
            let line = r.to_line().expect("encode");
            assert_eq!(
                parse_request(&line[..line.len() - 1]),
                Ok(r.clone()),
                "{}",
                r.op()
            );
        }
        assert_eq!(
            Request::SetDrive {
                id: "slot3".into(),
                path: None,
                read_only: true
            }
            .to_line()
            .expect("encode"),
            b"{\"op\":\"set_drive\",\"id\":\"slot3\",\"read_only\":true}\n"
        );
    }

    #[test]
    fn responses_keep_the_wire_format() {
        assert_eq!(Response::ok().to_line(), "{\"ok\":true}\n");
        assert_eq!(
            Response::error("no drive").to_line(),
            "{\"ok\":false,\"error\":\"no drive\"}\n"
        );
        let r = Response {
            capacity_sectors: Some(8),
            ..Response::ok()
        };
        assert_eq!(r.to_line(), "{\"ok\":true,\"capacity_sectors\":8}\n");
        assert_eq!(parse_response(r.to_line().trim_end().as_bytes()), Ok(r));
        assert_eq!(
            parse_response(br#"{"ok":false}"#),
            Err(ResponseError::Refused("error without a message".into()))
        );
        assert!(matches!(
            parse_response(br#"{"version":1}"#),
            Err(ResponseError::NoOk(_))
        ));
        assert!(matches!(
            parse_response(b"not json"),
            Err(ResponseError::Malformed(_))
        ));
    }
}
