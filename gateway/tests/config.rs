//! The configuration story, through the real binary: the TOML file,
//! environment variables and flags in that order of precedence, refusals
//! that name the key, and `--print-config` round trips.
//!
//! Every run clears the `COURIER_*` variables first (the suite itself sets
//! `COURIER_DRIVER`), so each test controls the environment layer exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    for (name, _) in std::env::vars() {
        if name.starts_with("COURIER_") || name == "RUST_LOG" {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

/// `--print-config` with `args` and `env`, parsed.
fn effective(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let out = gateway(&all, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().parse().unwrap()
}

fn get<'a>(t: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    t.get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("{section}.{key} in {t}"))
}

fn file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("courier.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs with a file and expects exit code 2 and `wanted` in the message.
fn refused(text: &str, wanted: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = file(dir.path(), text);
    let out = gateway(&["--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{text:?}: wanted {w:?} in {stderr}");
    }
    assert!(out.stdout.is_empty(), "nothing started or printed");
}

#[test]
fn without_a_file_the_defaults_are_the_shipped_example() {
    let defaults = effective(&[], &[]);
    assert_eq!(
        get(&defaults, "listen", "addr").as_str(),
        Some("127.0.0.1:8080")
    );
    assert_eq!(get(&defaults, "store", "data_dir").as_str(), Some("./data"));
    // deploy/courier.toml documents every key at its default.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/courier.toml");
    let shipped: toml::Table = std::fs::read_to_string(example).unwrap().parse().unwrap();
    assert_eq!(
        shipped, defaults,
        "deploy/courier.toml must list every key at its default"
    );
    // And it loads.
    assert_eq!(effective(&["--config", example], &[]), defaults);
}

#[test]
fn file_values_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        r#"
        [listen]
        addr = "127.0.0.1:25080"
        driver = "legacy"
        share_port = true
        [limits]
        send_rate = 12.5
        [heartbeat]
        ping_interval = 5
        [store]
        data_dir = "/srv/courier"
        [log]
        format = "json"
        "#,
    );
    let t = effective(&["--config", path.to_str().unwrap()], &[]);
    assert_eq!(get(&t, "listen", "addr").as_str(), Some("127.0.0.1:25080"));
    assert_eq!(get(&t, "listen", "driver").as_str(), Some("legacy"));
    assert_eq!(get(&t, "listen", "share_port").as_bool(), Some(true));
    assert_eq!(get(&t, "limits", "send_rate").as_float(), Some(12.5));
    assert_eq!(get(&t, "heartbeat", "ping_interval").as_integer(), Some(5));
    assert_eq!(get(&t, "heartbeat", "idle_timeout").as_integer(), Some(75));
    assert_eq!(get(&t, "store", "data_dir").as_str(), Some("/srv/courier"));
    assert_eq!(get(&t, "log", "format").as_str(), Some("json"));
    // COURIER_CONFIG names the file as --config does, and `serve` takes it too.
    let by_env = effective(&[], &[("COURIER_CONFIG", path.to_str().unwrap())]);
    assert_eq!(by_env, t);
    let out = gateway(
        &[
            "serve",
            "--print-config",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout)
            .unwrap()
            .parse::<toml::Table>()
            .unwrap(),
        t
    );
}

#[test]
fn a_flag_beats_its_variable_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        "[heartbeat]\nping_interval = 5\n[listen]\ncores = 3\n",
    );
    let cfg = path.to_str().unwrap();
    let ping = |args: &[&str], env: &[(&str, &str)]| {
        let t = effective(args, env);
        (
            get(&t, "heartbeat", "ping_interval").as_integer().unwrap(),
            get(&t, "listen", "cores").as_integer().unwrap(),
        )
    };
    assert_eq!(ping(&[], &[]), (25, 0), "default");
    assert_eq!(ping(&["--config", cfg], &[]), (5, 3), "file over default");
    let env = [("COURIER_PING_INTERVAL", "6")];
    assert_eq!(ping(&["--config", cfg], &env), (6, 3), "variable over file");
    assert_eq!(
        ping(&["--config", cfg, "--ping-interval", "7"], &env),
        (7, 3),
        "flag over variable"
    );
    assert_eq!(
        ping(&["--config", cfg, "--cores", "1"], &[]),
        (5, 1),
        "flag over file"
    );
    // A bool flag's variable beats the file's value too.
    let path = file(dir.path(), "[listen]\nshare_port = true\n");
    let t = effective(
        &["--config", path.to_str().unwrap()],
        &[("COURIER_SHARE_PORT", "false")],
    );
    assert_eq!(get(&t, "listen", "share_port").as_bool(), Some(false));
}

#[test]
fn unknown_keys_and_sections_are_refused_with_their_name() {
    refused(
        "[heartbeat]\npign_interval = 3\n",
        &[
            "unknown key \"pign_interval\"",
            "[heartbeat]",
            "courier.toml",
            "ping_interval",
        ],
    );
    refused("[limts]\nmax_body = 10\n", &["unknown section [limts]"]);
    refused("max_body = 10\n", &["unknown section [max_body]"]);
    refused(
        "[listen]\ndata_dir = \"x\"\n",
        &["unknown key \"data_dir\" in [listen]"],
    );
    refused(
        "[heartbeat]\nping_interval = 3\nping_interval = 4\n",
        &["not valid TOML"],
    );
}

#[test]
fn bad_values_are_refused_with_the_key_name() {
    refused(
        "[store]\nnode_id = 2000\n",
        &["store.node_id", "2000 is not in 0..1024"],
    );
    refused("[store]\ndedupe_hours = 1\n", &["store.dedupe_hours"]);
    refused(
        "[listen]\ndriver = \"fast\"\n",
        &["listen.driver", "expected one of auto, uring, legacy"],
    );
    refused(
        "[listen]\naddr = \"nowhere\"\n",
        &["listen.addr", "invalid socket address"],
    );
    refused(
        "[heartbeat]\nping_interval = \"soon\"\n",
        &["heartbeat.ping_interval"],
    );
    refused(
        "[heartbeat]\nping_interval = -1\n",
        &["heartbeat.ping_interval"],
    );
    refused(
        "[limits]\nmax_body = [1, 2]\n",
        &["limits.max_body", "found an array"],
    );
    refused(
        "[limits]\nsend_rate = { a = 1 }\n",
        &["limits.send_rate", "found a table"],
    );
    refused(
        "[log]\nformat = \"xml\"\n",
        &["log.format", "expected one of text, json"],
    );
    refused("[log]\nfilter = \"info,[[[\"\n", &["log.filter"]);
    refused("[listen]\nshare_port = \"maybe\"\n", &["listen.share_port"]);
    let dir = tempfile::tempdir().unwrap();
    let out = gateway(
        &[
            "--config",
            dir.path().join("missing.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn print_config_loads_back_to_the_same_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        dir.path(),
        "[limits]\nsend_burst = 7.25\nmax_connections = 3000\n[store]\nnode_id = 9\n",
    );
    let args = ["--config", path.to_str().unwrap(), "--idle-timeout", "99"];
    let env = [
        ("COURIER_DATA_DIR", "/tmp/with space/dir"),
        ("COURIER_DRIVER", "legacy"),
    ];
    let first = gateway(&[&["--print-config"], &args[..]].concat(), &env);
    assert!(first.status.success());
    let printed = String::from_utf8(first.stdout).unwrap();

    let again = file(dir.path(), &printed);
    let second = gateway(
        &["--print-config", "--config", again.to_str().unwrap()],
        &[],
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(String::from_utf8(second.stdout).unwrap(), printed);
    let t: toml::Table = printed.parse().unwrap();
    assert_eq!(get(&t, "heartbeat", "idle_timeout").as_integer(), Some(99));
    assert_eq!(
        get(&t, "store", "data_dir").as_str(),
        Some("/tmp/with space/dir")
    );
    assert_eq!(get(&t, "limits", "send_burst").as_float(), Some(7.25));
}

#[test]
fn a_node_serves_with_its_file_and_token_reads_the_data_dir_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = file(
        dir.path(),
        &format!(
            "[listen]\naddr = \"127.0.0.1:0\"\ncores = 1\n[metrics]\naddr = \"127.0.0.1:0\"\n\
             [store]\ndata_dir = {:?}\n",
            data.to_str().unwrap()
        ),
    );
    // The node creates its secret in the file's data directory...
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--config", path.to_str().unwrap()])
        .env_remove("COURIER_DATA_DIR")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !data.join(courier_gateway::secret::FILE_NAME).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // ...and `token --config` finds it there.
    let out = gateway(
        &[
            "token",
            "--user",
            "alice",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .split('.')
            .count(),
        3
    );
}

#[test]
fn a_token_for_a_bad_user_or_device_is_refused_as_a_bad_flag() {
    for (args, says) in [
        (&["token", "--user", "al ice"][..], "--user"),
        (&["token", "--user", ""][..], "--user"),
        (
            &["token", "--user", "alice", "--device", "0"][..],
            "--device",
        ),
    ] {
        let out = gateway(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn serving_flags_before_a_subcommand_are_refused_not_ignored() {
    // `gateway --config F serve` would otherwise serve without the file.
    let out = gateway(&["--cores", "3", "serve", "--print-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    // Flags after it, and variables, still apply.
    let out = gateway(
        &["serve", "--print-config", "--ping-interval", "9"],
        &[("COURIER_CORES", "3")],
    );
    assert!(out.status.success());
    let t: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    assert_eq!(get(&t, "listen", "cores").as_integer(), Some(3));
    assert_eq!(get(&t, "heartbeat", "ping_interval").as_integer(), Some(9));
}
