//! Fuzzes the JSON-RPC 2.0 codec (`wsgate::jsonrpc`) of Bayeux's
//! `/service/<name>` calls.
//!
//! Input: any bytes, read as a Bayeux message's `data` (lossy UTF-8), and
//! also as a service's result. Checks, for any input:
//! - `parse` never panics;
//! - it agrees with an independent reading by `serde_json::Value` of the
//!   request (a JSON string's content, else the text itself): a parse error
//!   exactly when that reading fails or nests deeper than
//!   `jsonrpc::MAX_DEPTH`; a call only for an object whose
//!   `jsonrpc` is `"2.0"`, whose `method` is that string, whose `params` is
//!   that array or object (`null` when absent) and whose `id` is that
//!   string, number or `null` (`None` when absent);
//! - every response (a refusal's, a result of any bytes, an error of any
//!   text) is one JSON object `{"jsonrpc":"2.0","result":..,"error":..,"id":..}`
//!   in that key order, that `Value` reads, echoing the id; a result is
//!   embedded exactly when `Value` reads it within the depth, else carried
//!   as the string of its text.
//!
//! `Value` refuses what the codec must refuse to pass on: lone surrogate
//! escapes and numbers beyond `f64` (`1e400`), which `RawValue` alone lets
//! through.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;
use wsgate::jsonrpc::{self, MAX_DEPTH, PARSE_ERROR};

/// Levels of arrays and objects in `v`.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The `Value` reading of `text`, `None` when it fails or is too deep.
fn read(text: &str) -> Option<Value> {
    serde_json::from_str::<Value>(text)
        .ok()
        .filter(|v| depth(v) <= MAX_DEPTH)
}

/// A response read back, its keys in order.
fn response(text: &str) -> Value {
    assert!(
        serde_json::from_str::<&RawValue>(text).is_ok(),
        "not JSON: {text}"
    );
    assert!(
        text.starts_with(r#"{"jsonrpc":"2.0","result":"#),
        "key order: {text}"
    );
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    assert_eq!(keys, ["error", "id", "jsonrpc", "result"], "{text}");
    assert_eq!(v["jsonrpc"], "2.0");
    v
}

fn id_value(id: Option<&str>) -> Value {
    id.map_or(Value::Null, |i| {
        serde_json::from_str(i).unwrap_or_else(|e| panic!("{e}: {i}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let inner = match serde_json::from_str::<Value>(&text) {
        Ok(Value::String(s)) => s,
        _ => text.to_string(),
    };
    let reading = read(&inner);
    match jsonrpc::parse(&text) {
        Ok(call) => {
            match &reading {
                Some(Value::Object(o)) => {
                    assert_eq!(o.get("jsonrpc"), Some(&Value::String("2.0".into())));
                    assert_eq!(o.get("method"), Some(&Value::String(call.method.clone())));
                    let params: Value = serde_json::from_slice(&call.params).unwrap();
                    match o.get("params") {
                        None => assert_eq!(params, Value::Null),
                        Some(p) => {
                            assert!(p.is_array() || p.is_object(), "{p}");
                            assert_eq!(&params, p);
                        }
                    }
                    match (o.get("id"), &call.id) {
                        (None, None) => {}
                        (Some(want), Some(id)) => {
                            assert!(want.is_string() || want.is_number() || want.is_null());
                            let got: Value = serde_json::from_str(id).unwrap();
                            assert_eq!(&got, want);
                        }
                        other => panic!("id {other:?}"),
                    }
                }
                other => panic!("a call from {inner:?}: {other:?}"),
            }
            let r = response(&jsonrpc::result(call.id.as_deref(), data));
            assert_eq!(r["error"], Value::Null);
            assert_eq!(r["id"], id_value(call.id.as_deref()));
            let e = response(&jsonrpc::error(call.id.as_deref(), -32000, &text));
            assert_eq!(e["error"]["message"], Value::String(text.to_string()));
            assert_eq!(e["result"], Value::Null);
        }
        Err(invalid) => {
            assert_eq!(
                invalid.code == PARSE_ERROR,
                reading.is_none(),
                "{invalid:?} for {inner:?}"
            );
            let r = response(&invalid.response());
            assert_eq!(r["error"]["code"], Value::from(invalid.code));
            assert_eq!(r["id"], id_value(invalid.id.as_deref()));
        }
    }
    // A service's result of any bytes: embedded when strict JSON, else a
    // string of its text.
    let r = response(&jsonrpc::result(Some("1"), data));
    match std::str::from_utf8(data).ok().and_then(read) {
        Some(v) => assert_eq!(r["result"], v),
        None => assert_eq!(r["result"], Value::String(text.to_string())),
    }
});
