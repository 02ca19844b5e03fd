//! `loadgen`: parse flags, run, print the summary, write the report, and
//! exit 0 (passed), 1 (a check failed) or 2 (the run could not be made).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

use courier_loadgen::Args;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let report_path = args.report.clone();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match courier_loadgen::run(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.summary());
    if let Some(path) = report_path {
        if let Err(e) = std::fs::write(&path, report.to_json() + "\n") {
            eprintln!(
                "loadgen: cannot write the report to {}: {e}",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        for why in &report.failures {
            eprintln!("loadgen: FAIL: {why}");
        }
        ExitCode::from(1)
    }
}
