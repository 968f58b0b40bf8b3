//! The bot protocol's messages (PROTOCOL §4): client operations parsed into types, server
//! replies serialized from types, and the closed set of error codes.
//!
//! Parsing happens here, at the edge: the rest of the gateway only sees [`Request`]s with
//! validated [`Pattern`]s, or a [`RequestError`] that already carries the code and the text
//! the bot will read. This module does no I/O.
//!
//! Client → server: `{"op":"subscribe","channels":[..],"since":{..}?,"req":..?}`,
//! `{"op":"unsubscribe","channels":[..],"req":..?}`, `{"op":"ping","req":..?}`.
//! Server → client: `subscribed`, `unsubscribed`, `pong`, `error` (with `channel` for
//! `history_truncated` / `replay_failed`), `recovered` (see [`Reply`]). `since` is checked
//! here for shape (exact channels of the request, stream ids); whether each channel is
//! durable is the router's check.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::durable::StreamId;
use crate::event::{Channel, Pattern};

/// Every reason the server refuses a request; the `code` field of an `error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text frame is not JSON.
    BadJson,
    /// Valid JSON, but a required field is missing or has the wrong type (or a binary frame).
    BadRequest,
    /// `op` names no known operation.
    UnknownOp,
    /// A channel pattern does not parse (the message says which and why).
    BadChannel,
    /// `unsubscribe` named a pattern this connection does not hold.
    NotSubscribed,
    /// The subscription would exceed `bots.max_subscriptions`.
    TooManySubscriptions,
    /// The subscription names a pattern outside the token's `allow` list.
    Forbidden,
    /// More requests than `bots.max_requests_per_sec` / `request_burst` allow; the request
    /// was not processed.
    RateLimited,
    /// The request is valid but asks for something this server does not do (yet).
    NotSupported,
    /// `since` is older than what the durable channel's stream still holds: entries after
    /// it were trimmed or deleted (not a refusal: the subscription stands).
    HistoryTruncated,
    /// The stream could not be read for a `since` replay (not a refusal: live events
    /// follow, without `recovered`).
    ReplayFailed,
    /// Not a refusal: a durable channel lost entries (trimmed before delivery).
    Gap,
}

impl ErrorCode {
    /// The wire name, also the `code` label of the refused-requests metric.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::HistoryTruncated => "history_truncated",
            ErrorCode::ReplayFailed => "replay_failed",
            ErrorCode::Gap => "gap",
        }
    }
}

/// The optional request id a bot attaches; echoed verbatim. Only numbers and strings are
/// accepted, so the echo is always a scalar the bot can compare.
pub type ReqId = Option<Value>;

/// One parsed client operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Subscribe {
        patterns: Vec<Pattern>,
        /// `since`: per exact channel of `patterns`, the last stream id the bot has; the
        /// router replays what follows (durable channels only, checked by the router).
        since: Since,
    },
    Unsubscribe {
        patterns: Vec<Pattern>,
    },
    Ping,
}

/// The `since` map of a `subscribe`, in the order the bot wrote it.
pub type Since = Vec<(Channel, StreamId)>;

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub op: Op,
    pub req: ReqId,
}

/// A refused request: what goes into the `error` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
    pub req: ReqId,
}

impl RequestError {
    pub fn new(code: ErrorCode, message: impl Into<String>, req: ReqId) -> RequestError {
        RequestError {
            code,
            message: message.into(),
            req,
        }
    }

    /// The `error` reply for this refusal.
    pub fn reply(&self) -> Reply {
        Reply::Error {
            code: self.code,
            message: self.message.clone(),
            req: self.req.clone(),
        }
    }
}

/// Parses one text frame from a bot.
pub fn parse_request(text: &str) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RequestError::new(ErrorCode::BadJson, format!("not valid JSON: {e}"), None))?;
    let Value::Object(map) = value else {
        return Err(RequestError::new(
            ErrorCode::BadRequest,
            "a request must be a JSON object",
            None,
        ));
    };
    // `req` first, so every later error can echo it.
    let req = match map.get("req") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::Number(_) | Value::String(_))) => Some(v.clone()),
        Some(_) => {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                "`req` must be a number or a string",
                None,
            ))
        }
    };
    let op = match map.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                "`op` must be a string",
                req,
            ))
        }
        None => {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                "missing field `op`",
                req,
            ))
        }
    };
    let op = match op {
        "subscribe" => {
            let patterns = patterns(&map, &req)?;
            let since = since(&map, &patterns, &req)?;
            Op::Subscribe { patterns, since }
        }
        "unsubscribe" => Op::Unsubscribe {
            patterns: patterns(&map, &req)?,
        },
        "ping" => Op::Ping,
        other => {
            return Err(RequestError::new(
                ErrorCode::UnknownOp,
                format!("unknown op `{other}` (expected subscribe, unsubscribe or ping)"),
                req,
            ))
        }
    };
    Ok(Request { op, req })
}

/// The `channels` field: a non-empty array of valid patterns, duplicates removed.
fn patterns(map: &Map<String, Value>, req: &ReqId) -> Result<Vec<Pattern>, RequestError> {
    let bad = |msg: &str| RequestError::new(ErrorCode::BadRequest, msg, req.clone());
    let list = match map.get("channels") {
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("`channels` must be an array of strings")),
        None => return Err(bad("missing field `channels`")),
    };
    if list.is_empty() {
        return Err(bad("`channels` must not be empty"));
    }
    let mut out: Vec<Pattern> = Vec::with_capacity(list.len());
    for item in list {
        let Value::String(text) = item else {
            return Err(bad("`channels` must be an array of strings"));
        };
        let pattern = Pattern::parse(text).map_err(|e| {
            RequestError::new(
                ErrorCode::BadChannel,
                format!("bad channel `{text}`: {e}"),
                req.clone(),
            )
        })?;
        if !out.contains(&pattern) {
            out.push(pattern);
        }
    }
    Ok(out)
}

/// The `since` field: an object mapping exact channels of the request's `channels` to
/// stream ids. Whether each channel is durable is the router's check (it knows the policy).
fn since(
    map: &Map<String, Value>,
    patterns: &[Pattern],
    req: &ReqId,
) -> Result<Since, RequestError> {
    let bad = |msg: String| RequestError::new(ErrorCode::BadRequest, msg, req.clone());
    let entries = match map.get("since") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(entries)) => entries,
        Some(_) => {
            return Err(bad(
                "`since` must be an object mapping channel to stream id".into(),
            ))
        }
    };
    let mut out: Since = Vec::with_capacity(entries.len());
    for (name, id) in entries {
        // Names are echoed back: cut what a bot could make arbitrarily long.
        let shown: String = name.chars().take(128).collect();
        let pattern = Pattern::parse(name)
            .map_err(|e| bad(format!("`since` names `{shown}`, not a channel: {e}")))?;
        if pattern.is_wildcard() {
            return Err(bad(format!(
                "`since` needs an exact channel, not the wildcard `{shown}`"
            )));
        }
        if !patterns.contains(&pattern) {
            return Err(bad(format!(
                "`since` names `{shown}`, which `channels` does not"
            )));
        }
        let channel = Channel::parse(name)
            .map_err(|e| bad(format!("`since` names `{shown}`, not a channel: {e}")))?;
        let Value::String(text) = id else {
            return Err(bad(format!(
                "`since` of `{shown}` must be a stream id string like \"1732300000000-0\""
            )));
        };
        let id: StreamId = text
            .parse()
            .map_err(|e| bad(format!("`since` of `{shown}`: {e}")))?;
        out.push((channel, id));
    }
    Ok(out)
}

/// A control reply from the server. Market events are not `Reply`s: they travel as the
/// exact bytes the bus carried.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Subscribed {
        channels: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        req: ReqId,
    },
    Unsubscribed {
        channels: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        req: ReqId,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        req: ReqId,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        req: ReqId,
    },
    /// An `error` about one channel of a request (`history_truncated`, `replay_failed`).
    #[serde(rename = "error")]
    ChannelError {
        code: ErrorCode,
        channel: String,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        req: ReqId,
    },
    /// A `since` replay of `channel` is complete: `count` events were replayed; live
    /// events follow.
    Recovered { channel: String, count: u64 },
}

impl Reply {
    pub fn to_json(&self) -> String {
        // Plain strings, enums and scalars: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The names of `patterns` as the bot wrote them (normalized by parsing).
    pub fn names(patterns: &[Pattern]) -> Vec<String> {
        patterns.iter().map(|p| p.as_str().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(text: &str) -> ErrorCode {
        parse_request(text).expect_err(text).code
    }

    #[test]
    fn parses_the_three_ops_and_echoes_req() {
        let r = parse_request(r#"{"op":"subscribe","channels":["trade:binance:BTC-USDT","ticker:*:ETH-USDT","trade:binance:BTC-USDT"],"req":1}"#).unwrap();
        assert_eq!(r.req, Some(json!(1)));
        match r.op {
            Op::Subscribe { patterns, since } => {
                assert_eq!(patterns.len(), 2, "duplicates collapse");
                assert!(since.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let r = parse_request(r#"{"op":"subscribe","channels":["trade:binance:BTC-USDT"],"since":{"trade:binance:BTC-USDT":"1-0"}}"#).unwrap();
        match r.op {
            Op::Subscribe { since, .. } => assert_eq!(
                since,
                vec![(
                    Channel::parse("trade:binance:BTC-USDT").unwrap(),
                    StreamId::new(1, 0)
                )]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.req, None);
        let r = parse_request(r#"{"op":"ping","req":"abc"}"#).unwrap();
        assert_eq!((r.op, r.req), (Op::Ping, Some(json!("abc"))));
        assert!(matches!(
            parse_request(r#"{"op":"unsubscribe","channels":["book:*:*"]}"#)
                .unwrap()
                .op,
            Op::Unsubscribe { .. }
        ));
    }

    #[test]
    fn refusals_have_the_right_code() {
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"req":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"op":5}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"op":"ping","req":{"a":1}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"op":"fly"}"#), ErrorCode::UnknownOp);
        assert_eq!(code(r#"{"op":"subscribe"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"op":"subscribe","channels":[]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"op":"subscribe","channels":[1]}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"op":"subscribe","channels":"trade:binance:BTC-USDT"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"op":"subscribe","channels":["trade:binance:BTC-USDT"],"since":3}"#),
            ErrorCode::BadRequest
        );
        for bad_since in [
            r#"{"trade:binance:BTC-USDT":"x-1"}"#,
            r#"{"trade:binance:BTC-USDT":5}"#,
            r#"{"trade:*:BTC-USDT":"1-0"}"#,
            r#"{"trade:binance:ETH-USDT":"1-0"}"#,
            r#"{"nope":"1-0"}"#,
        ] {
            let text = format!(
                r#"{{"op":"subscribe","channels":["trade:binance:BTC-USDT","trade:*:BTC-USDT"],"since":{bad_since},"req":3}}"#
            );
            let e = parse_request(&text).unwrap_err();
            assert_eq!(
                (e.code, e.req),
                (ErrorCode::BadRequest, Some(json!(3))),
                "{text}"
            );
        }
        let e = parse_request(r#"{"op":"subscribe","channels":["trade:nyse:BTC-USDT"],"req":7}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadChannel);
        assert!(
            e.message.contains("trade:nyse:BTC-USDT") && e.message.contains("nyse"),
            "{}",
            e.message
        );
        assert_eq!(e.req, Some(json!(7)));
    }

    #[test]
    fn replies_serialize_as_documented() {
        let r = Reply::Subscribed {
            channels: vec!["trade:binance:BTC-USDT".into()],
            req: Some(json!(1)),
        };
        assert_eq!(
            r.to_json(),
            r#"{"type":"subscribed","channels":["trade:binance:BTC-USDT"],"req":1}"#
        );
        assert_eq!(Reply::Pong { req: None }.to_json(), r#"{"type":"pong"}"#);
        let e =
            RequestError::new(ErrorCode::TooManySubscriptions, "limit 2", Some(json!("x"))).reply();
        assert_eq!(
            e.to_json(),
            r#"{"type":"error","code":"too_many_subscriptions","message":"limit 2","req":"x"}"#
        );
        let t = Reply::ChannelError {
            code: ErrorCode::HistoryTruncated,
            channel: "trade:binance:BTC-USDT".into(),
            message: "gone".into(),
            req: Some(json!(2)),
        };
        assert_eq!(
            t.to_json(),
            r#"{"type":"error","code":"history_truncated","channel":"trade:binance:BTC-USDT","message":"gone","req":2}"#
        );
        let r = Reply::Recovered {
            channel: "trade:binance:BTC-USDT".into(),
            count: 3,
        };
        assert_eq!(
            r.to_json(),
            r#"{"type":"recovered","channel":"trade:binance:BTC-USDT","count":3}"#
        );
    }
}
