//! The closing summary of a `nidd-bench` run over the socket backends (issue 11): one line per
//! backend (devices of its scale run, time to ready, RSS per device, restart time, MT and MO
//! ratios against the same run's ceilings) and the verdicts on the targets. Plain
//! figures in, text out, so the verdicts are tested without a bridge.
//!
//! "anyip no worse than per_socket" is judged within the run's noise: where the backends are
//! compared, the ceiling is measured before the first backend and again after the last, and
//! the relative spread of those two measurements of the same thing is the noise; it is never
//! taken below [`RATIO_TOLERANCE`].

use std::fmt::Write as _;
use std::time::Duration;

use nidd_bridge::config::SocketBackend;

/// Memory per idle device at scale (issue 11).
pub const RSS_PER_DEVICE_TARGET_KIB: f64 = 2.0;
/// Restart on the same store, process start → `/readyz` 200 (issue 11).
pub const RESTART_TARGET: Duration = Duration::from_secs(3);
/// The devices the memory goal is stated at.
pub const TARGET_DEVICES: usize = 100_000;
/// The least tolerance by which anyip's ratio against a ceiling may fall below per_socket's and
/// still count as no worse: chosen, not measured (ratios moved by more than this between runs
/// on the shared 2-core development machine). A larger spread of the bracketing ceilings
/// measured in the run replaces it.
pub const RATIO_TOLERANCE: f64 = 0.05;

/// The name of a backend as `sockets.backend` spells it.
pub fn backend_name(backend: SocketBackend) -> &'static str {
    match backend {
        SocketBackend::PerSocket => "per_socket",
        SocketBackend::AnyIp => "anyip",
    }
}

/// A backend's scale run, as the summary needs it.
#[derive(Debug, Clone, Copy)]
pub struct ScaleLine {
    pub devices: usize,
    /// Process start → `/readyz` 200 on a new store.
    pub ready: Duration,
    /// (RSS when ready − RSS of an idle bridge with few devices) / the devices added.
    pub rss_per_device_kib: f64,
    /// Process start → `/readyz` 200 on the same store after a SIGTERM.
    pub restart: Duration,
}

/// One backend's line of the summary.
#[derive(Debug, Clone)]
pub struct BackendLine {
    pub backend: SocketBackend,
    /// `None`: the scale run was skipped.
    pub scale: Option<ScaleLine>,
    /// Bridge / ceiling MT deliveries at the offered rate (`None`: not measured).
    pub mt_ratio: Option<f64>,
    /// Bridge / ceiling MO deliveries at each offered MO rate, in the order of `mo_rates`.
    pub mo_ratios: Vec<f64>,
}

/// Met, not met, or nothing to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    NotMeasured,
}

impl Verdict {
    fn of(ok: bool) -> Self {
        if ok { Self::Met } else { Self::NotMet }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::NotMet => "NOT MET",
            Self::NotMeasured => "not measured",
        }
    }
}

/// One target and how the run stands against it.
#[derive(Debug, Clone)]
pub struct Check {
    pub target: String,
    pub verdict: Verdict,
    pub detail: String,
}

/// The figures of a run the summary is drawn from.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub lines: Vec<BackendLine>,
    /// The offered MO rates, in the order of each line's `mo_ratios`.
    pub mo_rates: Vec<f64>,
    /// |a − b| / max(a, b) of the two ceiling measurements bracketing the backends at the MT
    /// offered rate (`None`: measured once).
    pub mt_spread: Option<f64>,
    /// The same at each MO rate.
    pub mo_spreads: Vec<Option<f64>>,
}

/// The tolerance of a comparison whose bracketing ceilings lay `spread` apart.
pub fn tolerance(spread: Option<f64>) -> f64 {
    spread.map_or(RATIO_TOLERANCE, |s| s.max(RATIO_TOLERANCE))
}

/// The verdicts on the targets: memory per device and restart time for each backend with a
/// scale run; anyip's MT and MO ratios against per_socket's when both ran.
pub fn checks(summary: &Summary) -> Vec<Check> {
    let lines = &summary.lines;
    let mut checks = Vec::new();
    for line in lines {
        let name = backend_name(line.backend);
        let Some(scale) = line.scale else {
            checks.push(Check {
                target: format!("{name}: scale targets"),
                verdict: Verdict::NotMeasured,
                detail: "scale run skipped".into(),
            });
            continue;
        };
        let short_of = if scale.devices < TARGET_DEVICES {
            format!(" (the goal is stated at {TARGET_DEVICES} devices)")
        } else {
            String::new()
        };
        checks.push(Check {
            target: format!("{name}: RSS per idle device ≤ {RSS_PER_DEVICE_TARGET_KIB} KiB"),
            verdict: Verdict::of(scale.rss_per_device_kib <= RSS_PER_DEVICE_TARGET_KIB),
            detail: format!(
                "{:.1} KiB at {} devices{short_of}",
                scale.rss_per_device_kib, scale.devices
            ),
        });
        checks.push(Check {
            target: format!(
                "{name}: restart on the same store → ready ≤ {} s",
                RESTART_TARGET.as_secs()
            ),
            verdict: Verdict::of(scale.restart <= RESTART_TARGET),
            detail: format!(
                "{:.1} s at {} devices",
                scale.restart.as_secs_f64(),
                scale.devices
            ),
        });
    }
    let find = |backend| lines.iter().find(|l| l.backend == backend);
    let (Some(per_socket), Some(anyip)) =
        (find(SocketBackend::PerSocket), find(SocketBackend::AnyIp))
    else {
        return checks;
    };
    let target = |what: &str| {
        format!(
            "{what} ratio: anyip ≥ per_socket − noise (the bracketing ceilings' spread, at least {RATIO_TOLERANCE})"
        )
    };
    checks.push(match (anyip.mt_ratio, per_socket.mt_ratio) {
        (Some(a), Some(p)) => Check {
            target: target("MT"),
            verdict: Verdict::of(a >= p - tolerance(summary.mt_spread)),
            detail: format!(
                "anyip {a:.2}, per_socket {p:.2}, noise {:.2}",
                tolerance(summary.mt_spread)
            ),
        },
        _ => Check {
            target: target("MT"),
            verdict: Verdict::NotMeasured,
            detail: String::new(),
        },
    });
    let pairs: Vec<(f64, f64, f64, f64)> = summary
        .mo_rates
        .iter()
        .zip(anyip.mo_ratios.iter().zip(&per_socket.mo_ratios))
        .enumerate()
        .map(|(index, (rate, (a, p)))| {
            let spread = summary.mo_spreads.get(index).copied().flatten();
            (*rate, *a, *p, tolerance(spread))
        })
        .collect();
    checks.push(if pairs.is_empty() {
        Check {
            target: target("MO"),
            verdict: Verdict::NotMeasured,
            detail: String::new(),
        }
    } else {
        Check {
            target: target("MO"),
            verdict: Verdict::of(pairs.iter().all(|(_, a, p, noise)| *a >= p - noise)),
            detail: pairs
                .iter()
                .map(|(rate, a, p, noise)| {
                    format!("at {rate:.0}/s anyip {a:.2}, per_socket {p:.2}, noise {noise:.2}")
                })
                .collect::<Vec<_>>()
                .join("; "),
        }
    });
    checks
}

/// The summary table and the verdicts under it.
pub fn render(summary: &Summary) -> String {
    let mut out = String::new();
    let mo_header = format!(
        "MO ratio ({})",
        summary
            .mo_rates
            .iter()
            .map(|r| format!("{r:.0}/s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "{:<10} | {:>7} | {:>7} | {:>14} | {:>9} | {:>8} | {}",
        "backend", "devices", "ready s", "RSS/device KiB", "restart s", "MT ratio", mo_header
    );
    for line in &summary.lines {
        let (devices, ready, rss, restart) = match line.scale {
            Some(s) => (
                s.devices.to_string(),
                format!("{:.1}", s.ready.as_secs_f64()),
                format!("{:.1}", s.rss_per_device_kib),
                format!("{:.1}", s.restart.as_secs_f64()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let mt = line
            .mt_ratio
            .map_or_else(|| "-".into(), |r| format!("{r:.2}"));
        let mo = if line.mo_ratios.is_empty() {
            "-".into()
        } else {
            line.mo_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{:<10} | {devices:>7} | {ready:>7} | {rss:>14} | {restart:>9} | {mt:>8} | {mo}",
            backend_name(line.backend)
        );
    }
    for check in checks(summary) {
        let detail = if check.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", check.detail)
        };
        let _ = writeln!(
            out,
            "  {:<12} {}{detail}",
            check.verdict.text(),
            check.target
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(backend: SocketBackend, rss: f64, restart_ms: u64, mt: f64, mo: &[f64]) -> BackendLine {
        BackendLine {
            backend,
            scale: Some(ScaleLine {
                devices: if backend == SocketBackend::AnyIp {
                    100_000
                } else {
                    19_000
                },
                ready: Duration::from_secs(10),
                rss_per_device_kib: rss,
                restart: Duration::from_millis(restart_ms),
            }),
            mt_ratio: Some(mt),
            mo_ratios: mo.to_vec(),
        }
    }

    fn verdicts(checks: &[Check]) -> Vec<(String, Verdict)> {
        checks
            .iter()
            .map(|c| (c.target.clone(), c.verdict))
            .collect()
    }

    #[test]
    fn each_target_is_judged_per_backend_and_anyip_against_per_socket() {
        let mut summary = Summary {
            lines: vec![
                line(SocketBackend::PerSocket, 9.5, 1_300, 0.90, &[1.0, 0.92]),
                line(SocketBackend::AnyIp, 1.9, 4_900, 0.86, &[1.0, 0.80]),
            ],
            mo_rates: vec![20_000.0, 40_000.0],
            mt_spread: Some(0.01),
            mo_spreads: vec![Some(0.02), Some(0.10)],
        };
        let listed = checks(&summary);
        let judged = verdicts(&listed);
        assert_eq!(judged.len(), 6, "{judged:?}");
        assert_eq!(judged[0].1, Verdict::NotMet, "per_socket 9.5 KiB");
        assert_eq!(judged[1].1, Verdict::Met, "per_socket restart 1.3 s");
        assert_eq!(judged[2].1, Verdict::Met, "anyip 1.9 KiB");
        assert_eq!(judged[3].1, Verdict::NotMet, "anyip restart 4.9 s");
        assert_eq!(
            judged[4].1,
            Verdict::Met,
            "MT 0.86 within 0.05 (the least) of 0.90"
        );
        assert_eq!(
            judged[5].1,
            Verdict::NotMet,
            "MO 0.80 against 0.92, noise 0.10"
        );
        assert!(listed[0].detail.contains("stated at 100000"), "{listed:?}");
        assert!(!listed[2].detail.contains("stated at"), "{listed:?}");
        // A wider spread of the bracketing ceilings widens the tolerance.
        summary.mo_spreads[1] = Some(0.13);
        assert_eq!(verdicts(&checks(&summary))[5].1, Verdict::Met);
        summary.mt_spread = None;
        summary.lines[1].mt_ratio = Some(0.84);
        assert_eq!(verdicts(&checks(&summary))[4].1, Verdict::NotMet);
    }

    #[test]
    fn one_backend_alone_gets_no_comparison_and_a_skipped_scale_run_no_verdict() {
        let mut summary = Summary {
            lines: vec![line(SocketBackend::AnyIp, 2.0, 3_000, 1.0, &[1.0])],
            mo_rates: vec![20_000.0],
            ..Summary::default()
        };
        let checks = checks(&summary);
        assert_eq!(
            verdicts(&checks).iter().map(|v| v.1).collect::<Vec<_>>(),
            [Verdict::Met, Verdict::Met],
            "2.0 KiB and 3.0 s are at the targets"
        );
        summary.lines[0].scale = None;
        let text = render(&summary);
        assert!(text.contains("not measured"), "{text}");
        assert!(text.contains("anyip      |       - |"), "{text}");
    }
}
