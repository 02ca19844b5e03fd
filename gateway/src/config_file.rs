//! The configuration file, and how it meets flags and environment variables.
//!
//! A file named by `--config` (or `COURIER_CONFIG`) is TOML in sections;
//! every key is one flag of [`ServeArgs`] and so also one `COURIER_*`
//! variable ([`KEYS`] says which). Precedence, highest first: the flag, its
//! variable, the file, the built-in default. Without a file the defaults run
//! the embedded node, as before.
//!
//! How the layers meet: clap parses the command line once to learn which
//! arguments came from a flag or a variable and where the file is; each key
//! of the file that neither gave is checked with that argument's own value
//! parser (so the file accepts exactly what the flag accepts) and becomes
//! the argument's default; clap then parses again. An unknown section or
//! key, or a value its flag would refuse, stops the start with the key's
//! name ([`LoadError::File`], exit code 2).
//!
//! `--print-config` renders the effective values as the same TOML, which
//! loads back to the same configuration.

use std::any::TypeId;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::config::{Cli, Command, ServeArgs, TokenArgs};

/// One key of the file: `[section] name`, read into the argument `arg`
/// (clap's id, the `ServeArgs` field name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The TOML section.
    pub section: &'static str,
    /// The key within the section.
    pub name: &'static str,
    /// The clap argument id the key sets.
    pub arg: &'static str,
}

const fn key(section: &'static str, name: &'static str, arg: &'static str) -> Key {
    Key { section, name, arg }
}

/// Every key of the file, in the order `--print-config` prints them.
/// Each serving flag has exactly one key (a test checks it).
pub const KEYS: &[Key] = &[
    key("listen", "addr", "listen"),
    key("listen", "cores", "cores"),
    key("listen", "driver", "driver"),
    key("listen", "share_port", "share_port"),
    key("listen", "handshake_timeout_ms", "handshake_timeout_ms"),
    key("listen", "allowed_origins", "allowed_origins"),
    key("listen", "web_client", "web_client"),
    key("limits", "max_connections", "max_connections"),
    key("limits", "max_connections_per_ip", "max_connections_per_ip"),
    key("limits", "connect_rate_per_ip", "connect_rate_per_ip"),
    key("limits", "max_header_bytes", "max_header_bytes"),
    key("limits", "max_outbound_bytes", "max_outbound_bytes"),
    key(
        "limits",
        "max_outbound_total_bytes",
        "max_outbound_total_bytes",
    ),
    key("limits", "max_body", "max_body"),
    key("limits", "max_group_members", "max_group_members"),
    key("limits", "send_rate", "send_rate"),
    key("limits", "send_burst", "send_burst"),
    key("limits", "max_devices", "max_devices"),
    key("presence", "debounce_ms", "presence_debounce_ms"),
    key("presence", "writes_per_s", "presence_writes_per_s"),
    key("presence", "typing_ttl_ms", "typing_ttl_ms"),
    key("heartbeat", "ping_interval", "ping_interval_s"),
    key("heartbeat", "idle_timeout", "idle_timeout_s"),
    key("store", "data_dir", "data_dir"),
    key("store", "node_id", "node_id"),
    key("store", "dedupe_hours", "dedupe_hours"),
    key("store", "batch_linger_us", "batch_linger_us"),
    key("store", "sync_thread", "sync_thread"),
    key("store", "cache_mib", "store_cache_mib"),
    key("store", "write_buffer_mib", "store_write_buffer_mib"),
    key("store", "memtable_mib", "store_memtable_mib"),
    key("store", "background_nice", "store_background_nice"),
    key("store", "dedupe_compaction", "store_dedupe_compaction"),
    key("store", "entries_compaction", "store_entries_compaction"),
    key("store", "recent_entries_mib", "recent_entries_mib"),
    key("shutdown", "drain_window_ms", "drain_window_ms"),
    key("push", "delay_ms", "push_delay_ms"),
    key("push", "coalesce_ms", "push_coalesce_ms"),
    key("push", "max_attempts", "push_max_attempts"),
    key("push", "backoff_ms", "push_backoff_ms"),
    key("push", "backoff_max_ms", "push_backoff_max_ms"),
    key("push", "concurrency", "push_concurrency"),
    key("push", "rate", "push_rate"),
    key("push", "max_ciphertext", "push_max_ciphertext"),
    key("push", "ca_file", "push_ca_file"),
    key("push_webhook", "url", "push_webhook_url"),
    key("push_webhook", "secret_file", "push_webhook_secret_file"),
    key("push_fcm", "credentials", "push_fcm_credentials"),
    key("push_fcm", "endpoint", "push_fcm_endpoint"),
    key("push_apns", "key_file", "push_apns_key_file"),
    key("push_apns", "key_id", "push_apns_key_id"),
    key("push_apns", "team_id", "push_apns_team_id"),
    key("push_apns", "topic", "push_apns_topic"),
    key("push_apns", "endpoint", "push_apns_endpoint"),
    key("metrics", "addr", "metrics_listen"),
    key("metrics", "admin_token_file", "admin_token_file"),
    key("log", "filter", "log_filter"),
    key("log", "format", "log_format"),
    key("fleet", "role", "role"),
    key("fleet", "nats", "nats"),
    key("fleet", "partitions", "partitions"),
    key("fleet", "nats_replicas", "nats_replicas"),
    key("fleet", "lease_ttl_ms", "lease_ttl_ms"),
    key("fleet", "gateway_ttl_ms", "gateway_ttl_ms"),
    key("fleet", "snapshot_min_kib", "snapshot_min_kib"),
];

/// Arguments that are about the file itself and have no key.
pub const NOT_IN_FILE: &[&str] = &["config", "print_config"];

/// What the command line asks for, with the file applied.
#[derive(Debug)]
pub enum Invocation {
    /// Serve with this configuration.
    Serve(Box<ServeArgs>),
    /// Print this effective configuration (TOML) and exit.
    PrintConfig(String),
    /// Print a token.
    Token(TokenArgs),
}

/// Why the configuration was refused.
#[derive(Debug)]
pub enum LoadError {
    /// A flag or variable was refused, or help or the version was asked
    /// for: clap prints it and picks the exit code (`clap::Error::exit`).
    Cli(clap::Error),
    /// The file could not be read, is not TOML, or has an unknown key or a
    /// bad value; exit code 2.
    File {
        /// The file as named on the command line.
        path: PathBuf,
        /// What is wrong, naming the key.
        problem: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cli(e) => write!(f, "{e}"),
            Self::File { problem, .. } => f.write_str(problem),
        }
    }
}

impl std::error::Error for LoadError {}

impl From<clap::Error> for LoadError {
    fn from(e: clap::Error) -> Self {
        Self::Cli(e)
    }
}

/// Parses `argv` (program name first), applying the configuration file if
/// one is named.
pub fn load<I, T>(argv: I) -> Result<Invocation, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    // The first parse runs on a command of its own: clap indexes a command's
    // arguments when it first parses, and the defaults set below move them.
    let first = Cli::command().try_get_matches_from(&argv)?;
    let mut cmd = Cli::command();
    let sub = first.subcommand().map(|(name, m)| (name.to_owned(), m));
    let given = sub.as_ref().map_or(&first, |(_, m)| m);

    if let Some(path) = given.get_one::<PathBuf>("config") {
        let file = read(path)?;
        let target = sub
            .as_ref()
            .and_then(|(name, _)| cmd.find_subcommand(name))
            .unwrap_or(&cmd);
        let applies: Vec<&str> = target
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .collect();
        let mut defaults = Vec::new();
        for (key, values) in check(&file, path, &cmd)? {
            // `token` takes only the keys it has a flag for (the data directory).
            if !applies.contains(&key.arg) {
                continue;
            }
            let explicit = matches!(
                given.value_source(key.arg),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if !explicit {
                defaults.push((key.arg, values));
            }
        }
        for (arg, values) in defaults {
            cmd = set_default(cmd, sub.as_ref().map(|(n, _)| n.as_str()), arg, values);
        }
    }

    let matches = cmd.try_get_matches_from_mut(&argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let (args, serve_matches) = match cli.command {
        Some(Command::Token(args)) => return Ok(Invocation::Token(args)),
        Some(Command::Serve(args)) => {
            let m = matches.subcommand_matches("serve").unwrap_or(&matches);
            (args, m)
        }
        None => (cli.serve, &matches),
    };
    if args.print_config {
        return Ok(Invocation::PrintConfig(render(&cmd, serve_matches)));
    }
    Ok(Invocation::Serve(Box::new(args)))
}

/// Reads and parses the file.
fn read(path: &Path) -> Result<toml::Table, LoadError> {
    let refuse = |problem: String| LoadError::File {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| refuse(format!("reading {}: {e}", path.display())))?;
    text.parse::<toml::Table>()
        .map_err(|e| refuse(format!("{} is not valid TOML: {e}", path.display())))
}

/// Checks every section and key of the file against [`KEYS`] and every
/// value against its argument's parser; returns each key's values as the
/// strings a flag would carry.
fn check(
    file: &toml::Table,
    path: &Path,
    cmd: &clap::Command,
) -> Result<Vec<(Key, Vec<String>)>, LoadError> {
    let refuse = |problem: String| LoadError::File {
        path: path.to_owned(),
        problem,
    };
    let shown = path.display();
    let mut out = Vec::new();
    for (section, table) in file {
        let known: Vec<&str> = KEYS
            .iter()
            .filter(|k| k.section == section)
            .map(|k| k.name)
            .collect();
        if known.is_empty() {
            return Err(refuse(format!(
                "unknown section [{section}] in {shown} (sections: {})",
                sections().join(", ")
            )));
        }
        let Some(table) = table.as_table() else {
            return Err(refuse(format!(
                "\"{section}\" in {shown} must be a section ([{section}]), not a value"
            )));
        };
        for (name, value) in table {
            let Some(key) = KEYS.iter().find(|k| k.section == section && k.name == name) else {
                return Err(refuse(format!(
                    "unknown key \"{name}\" in [{section}] of {shown} (keys there: {})",
                    known.join(", ")
                )));
            };
            let bad =
                |why: String| refuse(format!("bad value for {section}.{name} in {shown}: {why}"));
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == key.arg)
                .ok_or_else(|| bad("the key has no flag (a bug)".into()))?;
            let values = strings(value, arg).map_err(bad)?;
            for v in &values {
                validate(arg, v).map_err(|why| bad(format!("{value}: {why}")))?;
            }
            out.push((*key, values));
        }
    }
    Ok(out)
}

/// The sections, in [`KEYS`] order.
fn sections() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for k in KEYS {
        if !out.contains(&k.section) {
            out.push(k.section);
        }
    }
    out
}

/// A TOML value as the flag's string values; a list only where the
/// argument takes several.
fn strings(value: &toml::Value, arg: &Arg) -> Result<Vec<String>, String> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a single value, found a {}",
            other.type_str()
        )),
    };
    match value {
        toml::Value::Array(items) if takes_many(arg) => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("expected a single value, found an array".into()),
        v => Ok(vec![scalar(v)?]),
    }
}

fn takes_many(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

/// Runs `value` through `arg`'s own value parser, alone.
fn validate(arg: &Arg, value: &str) -> Result<(), String> {
    let probe = clap::Command::new("config")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(
            Arg::new("value")
                .long("value")
                .action(ArgAction::Set)
                .value_parser(arg.get_value_parser().clone()),
        );
    match probe.try_get_matches_from([format!("--value={value}")]) {
        Ok(_) => Ok(()),
        Err(e) => Err(match std::error::Error::source(&e) {
            Some(inner) => inner.to_string(),
            None => {
                let choices: Vec<String> = arg
                    .get_possible_values()
                    .iter()
                    .map(|p| p.get_name().to_owned())
                    .collect();
                if choices.is_empty() {
                    e.kind().to_string()
                } else {
                    format!("expected one of {}", choices.join(", "))
                }
            }
        }),
    }
}

/// Makes `values` the default of argument `id`, on the subcommand when one
/// runs (flags may come before or after `serve`).
fn set_default(
    cmd: clap::Command,
    sub: Option<&str>,
    id: &'static str,
    values: Vec<String>,
) -> clap::Command {
    let has = |c: &clap::Command| c.get_arguments().any(|a| a.get_id() == id);
    let apply = |c: clap::Command| {
        if has(&c) {
            c.mut_arg(id, |a| a.default_values(values.clone()))
        } else {
            c
        }
    };
    match sub {
        Some(name) => cmd.mut_subcommand(name, apply),
        None => apply(cmd),
    }
}

/// The effective configuration as TOML, one section per block in [`KEYS`]
/// order.
fn render(cmd: &clap::Command, m: &ArgMatches) -> String {
    let mut out =
        String::from("# Effective Courier gateway configuration (gateway --print-config).\n");
    for section in sections() {
        out.push_str(&format!("\n[{section}]\n"));
        for key in KEYS.iter().filter(|k| k.section == section) {
            let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == key.arg) else {
                continue;
            };
            if let Some(value) = typed(arg, m) {
                out.push_str(&format!("{} = {value}\n", key.name));
            }
        }
    }
    out
}

/// An argument's effective value as a TOML value of its type.
fn typed(arg: &Arg, m: &ArgMatches) -> Option<toml::Value> {
    let id = arg.get_id().as_str();
    let ty = arg.get_value_parser().type_id();
    if ty == TypeId::of::<bool>() {
        return Some(toml::Value::Boolean(m.get_flag(id)));
    }
    let raw: Vec<String> = m
        .get_raw(id)?
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    let one = |s: String| -> toml::Value {
        let integer = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i64>(),
        ]
        .iter()
        .any(|t| ty == *t);
        if integer {
            if let Ok(i) = s.parse::<i64>() {
                return toml::Value::Integer(i);
            }
        }
        if ty == TypeId::of::<f64>() {
            if let Ok(f) = s.parse::<f64>() {
                return toml::Value::Float(f);
            }
        }
        toml::Value::String(s)
    };
    if takes_many(arg) {
        Some(toml::Value::Array(raw.into_iter().map(one).collect()))
    } else {
        raw.into_iter().next().map(one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_serving_flag_has_one_key_and_every_key_a_flag() {
        let cmd = Cli::command();
        let ids: Vec<&str> = cmd
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| !NOT_IN_FILE.contains(id) && *id != "help" && *id != "version")
            .collect();
        for id in &ids {
            let n = KEYS.iter().filter(|k| k.arg == *id).count();
            assert_eq!(
                n, 1,
                "flag `{id}` needs exactly one key in config_file::KEYS \
                 (and a line in deploy/courier.toml), has {n}"
            );
        }
        for k in KEYS {
            assert!(
                ids.contains(&k.arg),
                "key {}.{} names no flag",
                k.section,
                k.name
            );
        }
    }
}
