//! The router's metrics, on the server's registry.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};

use super::CallError;
use crate::metrics::Metrics;

/// Every `outcome` of `wsgate_calls_total`, exported at 0 from the start.
pub const CALL_OUTCOMES: [&str; 10] = [
    "ok",
    "failed",
    "not_allowed",
    "no_such_service",
    "no_such_method",
    "timeout",
    "service_gone",
    "busy",
    "too_large",
    "unavailable",
];

/// See the module docs.
#[derive(Clone)]
pub struct RpcMetrics {
    /// `wsgate_calls_total{outcome}`: calls routed by this node, by how they
    /// ended ([`CALL_OUTCOMES`]; `invalid` ones count as `failed`).
    pub calls: IntCounterVec,
    /// `wsgate_calls_in_flight`: calls of this node's callers waiting for
    /// their service.
    pub in_flight: IntGauge,
    /// `wsgate_call_seconds`: how long calls took, from routing to the end.
    pub seconds: Histogram,
    /// `wsgate_call_late_replies_total`: replies that came after their call
    /// ended (timed out, or its instance was declared gone): dropped.
    pub late_replies: IntCounter,
    /// `wsgate_service_instances`: service instances connected to this node.
    pub instances: IntGauge,
    /// `wsgate_service_processes`: service and consumer connections of this
    /// node, registered or not.
    pub processes: IntGauge,
}

impl RpcMetrics {
    /// Creates the metrics and adds them to `metrics`' registry.
    pub fn new(metrics: &Metrics) -> RpcMetrics {
        let m = RpcMetrics {
            calls: IntCounterVec::new(
                Opts::new(
                    "wsgate_calls_total",
                    "Calls routed by this node, by outcome",
                ),
                &["outcome"],
            )
            .unwrap_or_else(never),
            in_flight: IntGauge::new(
                "wsgate_calls_in_flight",
                "Calls of this node's callers waiting for their service",
            )
            .unwrap_or_else(never),
            seconds: Histogram::with_opts(
                HistogramOpts::new("wsgate_call_seconds", "Time calls took to end").buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
            )
            .unwrap_or_else(never),
            late_replies: IntCounter::new(
                "wsgate_call_late_replies_total",
                "Service replies that came after their call ended",
            )
            .unwrap_or_else(never),
            instances: IntGauge::new(
                "wsgate_service_instances",
                "Service instances connected to this node",
            )
            .unwrap_or_else(never),
            processes: IntGauge::new(
                "wsgate_service_processes",
                "Service and consumer connections of this node",
            )
            .unwrap_or_else(never),
        };
        metrics.register(Box::new(m.calls.clone()));
        metrics.register(Box::new(m.in_flight.clone()));
        metrics.register(Box::new(m.seconds.clone()));
        metrics.register(Box::new(m.late_replies.clone()));
        metrics.register(Box::new(m.instances.clone()));
        metrics.register(Box::new(m.processes.clone()));
        for outcome in CALL_OUTCOMES {
            m.calls.with_label_values(&[outcome]).inc_by(0);
        }
        m
    }

    /// Counts one ended call.
    pub fn ended(&self, outcome: &Result<bytes::Bytes, CallError>, seconds: f64) {
        let label = match outcome {
            Ok(_) => "ok",
            Err(CallError::NotAllowed) => "not_allowed",
            Err(CallError::NoSuchService) => "no_such_service",
            Err(CallError::NoSuchMethod) => "no_such_method",
            Err(CallError::Timeout) => "timeout",
            Err(CallError::ServiceGone) => "service_gone",
            Err(CallError::Busy) => "busy",
            Err(CallError::TooLarge) => "too_large",
            Err(CallError::Unavailable) => "unavailable",
            Err(CallError::Invalid(_) | CallError::Failed { .. }) => "failed",
        };
        self.calls.with_label_values(&[label]).inc();
        self.seconds.observe(seconds);
    }
}

/// Metric constructors only fail on invalid names, which are constants here.
fn never<T>(e: prometheus::Error) -> T {
    unreachable!("invalid metric definition: {e}")
}
