//! `loadgen`: parse flags (and a scenario file), run, print the summary,
//! write the reports, and exit 0 (passed), 1 (a check failed), 2 (the run
//! could not be made) or 3 (the checks passed but a threshold was broken).
//!
//! `loadgen size REPORT.json` sizes a fleet from a saved report;
//! `loadgen worker` is a worker process, started by loadgen itself;
//! `loadgen push` drives and checks push notifications (see `push`);
//! `loadgen peer` measures Courier and peer servers in their own
//! protocols (see `peer`).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use courier_loadgen::scenario::Scenario;
use courier_loadgen::sizing::SizeArgs;
use courier_loadgen::{html, Args, Config, ConfigError};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A check failed (lost, reordered, invalid, nothing acked).
const EXIT_CHECK: u8 = 1;
/// The run could not be made.
const EXIT_SETUP: u8 = 2;
/// The checks passed but a threshold did not hold.
const EXIT_THRESHOLD: u8 = 3;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    // A command's own flags, after its name as its usage shows it.
    let command = |name: &str| -> Vec<String> {
        std::iter::once(format!("loadgen {name}"))
            .chain(argv.iter().skip(2).cloned())
            .collect()
    };
    match argv.get(1).map(String::as_str) {
        Some("worker") => return courier_loadgen::worker_process(),
        Some("size") => return size(&command("size")),
        Some("push") => return courier_loadgen::push::main(&command("push")),
        Some("peer") => return courier_loadgen::peer::main(&command("peer")),
        Some("peer-worker") => return courier_loadgen::peer::worker_process(),
        _ => {}
    }
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let given = |id: &str| {
        matches
            .try_get_raw(id)
            .is_ok_and(|_| matches.value_source(id) == Some(ValueSource::CommandLine))
    };
    let mut phases = Vec::new();
    let mut scenario_name = None;
    if let Some(path) = args.scenario.clone() {
        let loaded = Scenario::load(&path).and_then(|s| {
            let phases = s.apply(&mut args, &given)?;
            Ok((s.name.clone(), phases))
        });
        match loaded {
            Ok((name, p)) => {
                phases = p;
                scenario_name =
                    name.or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()));
            }
            Err(why) => {
                let e = ConfigError::Scenario {
                    path: path.display().to_string(),
                    why,
                };
                eprintln!("loadgen: {e}");
                return ExitCode::from(EXIT_SETUP);
            }
        }
    }
    let report_path = args.report.clone();
    let html_path = args
        .html
        .clone()
        .or_else(|| report_path.as_deref().map(html_beside));
    let mut config: Config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    config.phases = phases;
    config.scenario = scenario_name;
    let report = match courier_loadgen::run(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    print!("{}", report.summary());
    let writes = [
        (report_path, report.to_json() + "\n", "report"),
        (html_path, html::render(&report), "HTML report"),
    ];
    for (path, text, what) in writes {
        let Some(path) = path else { continue };
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!(
                "loadgen: cannot write the {what} to {}: {e}",
                path.display()
            );
            return ExitCode::from(EXIT_SETUP);
        }
    }
    if !report.passed {
        for why in &report.failures {
            eprintln!("loadgen: FAIL: {why}");
        }
        return ExitCode::from(EXIT_CHECK);
    }
    if !report.thresholds_passed {
        for t in report.thresholds.iter().filter(|t| !t.passed) {
            eprintln!("loadgen: threshold broken: {}", t.expr);
        }
        return ExitCode::from(EXIT_THRESHOLD);
    }
    ExitCode::SUCCESS
}

/// `out.json` -> `out.html` (or `out` -> `out.html`).
fn html_beside(report: &Path) -> PathBuf {
    report.with_extension("html")
}

fn size(argv: &[String]) -> ExitCode {
    let args = SizeArgs::parse_from(argv);
    match args.run() {
        Ok(sizing) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&sizing).unwrap_or_default()
                );
            } else {
                print!("{}", sizing.text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen size: {e}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}
