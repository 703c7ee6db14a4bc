//! `peersync node --config FILE`: a TOML file of the node's flags, and `peersync config example`.
//!
//! Every key is a flag of `peersync node` without its leading `--` (`data-dir`, `max-value-bytes`,
//! `bootstrap` as an array...). The file is turned into flags placed before the command line's, and
//! clap parses the two together, so one parser checks both and a flag given on the command line wins.
//! An unknown key, or a value of the wrong kind, is an error naming it.

use std::ffi::OsString;

use clap::{Arg, ArgAction, Command};

/// Flags of the command line that are not keys of the file.
const NOT_KEYS: [&str; 2] = ["config", "help"];

/// `argv` with the flags of `--config FILE` (when `argv` runs `node` with one) put in front of the
/// command line's own. Errors name the file and the key.
pub fn expand(cli: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    if argv.get(1).and_then(|a| a.to_str()) != Some("node") {
        return Ok(argv);
    }
    let given: Vec<String> = argv[2..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let Some(path) = config_path(&given) else { return Ok(argv) };
    let node = cli.find_subcommand("node").expect("the node subcommand");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read --config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("--config {path} is not valid TOML: {e}"))?;
    let mut from_file: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let arg = node
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !NOT_KEYS.contains(&key.as_str()))
            .ok_or_else(|| {
                format!("--config {path}: unknown key {key:?} (the keys are the flags of `peersync node` without their --; `peersync config example` lists them)")
            })?;
        let flag = format!("--{key}");
        if given.iter().any(|g| *g == flag || g.starts_with(&format!("{flag}="))) {
            continue; // The command line overrides the file.
        }
        flags_of(arg, &flag, value, &mut from_file).map_err(|e| format!("--config {path}: {key}: {e}"))?;
    }
    let mut out = argv[..2].to_vec();
    out.extend(from_file);
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

fn config_path(given: &[String]) -> Option<String> {
    let mut it = given.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_owned());
        }
    }
    None
}

/// The command-line form of one key's value.
fn flags_of(arg: &Arg, flag: &str, value: &toml::Value, out: &mut Vec<OsString>) -> Result<(), String> {
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on)) => {
            if *on {
                out.push(flag.into());
            }
            Ok(())
        }
        (ArgAction::SetTrue, other) => Err(format!("expected true or false, found {}", other.type_str())),
        (_, toml::Value::Array(items)) if repeatable => {
            for item in items {
                out.push(flag.into());
                out.push(scalar(item)?.into());
            }
            Ok(())
        }
        (_, toml::Value::Array(_)) => Err("takes one value, not an array".into()),
        (_, v) => {
            out.push(flag.into());
            out.push(scalar(v)?.into());
            Ok(())
        }
    }
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        other => Err(format!("expected a string or an integer, found {}", other.type_str())),
    }
}

/// A commented configuration file with every key of `peersync node` and its default.
pub fn example(cli: &Command) -> String {
    let node = cli.find_subcommand("node").expect("the node subcommand");
    let mut out = String::from(
        "# peersync node configuration: `peersync node --config FILE`.\n\
         # Every key is a flag of `peersync node` without its leading --; a flag given on the command\n\
         # line overrides the file. An unknown key or a bad value stops the node, naming it.\n\
         # The values shown are the defaults; uncomment a line to change it.\n",
    );
    for arg in node.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_KEYS.contains(&long) {
            continue;
        }
        out.push('\n');
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        for line in wrap(&help, 96).into_iter().filter(|l| !l.is_empty()) {
            out.push_str(&format!("# {line}\n"));
        }
        if arg.is_hide_set() {
            out.push_str("# (advanced: tuning for tests and benchmarks)\n");
        }
        out.push_str(&format!("# {long} = {}\n", default_of(arg)));
    }
    out
}

fn default_of(arg: &Arg) -> String {
    let defaults: Vec<String> = arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
    let placeholder = || {
        let name = arg.get_value_names().and_then(|n| n.first()).map_or("VALUE".to_owned(), |n| n.to_string());
        format!("{name:?}")
    };
    match arg.get_action() {
        ArgAction::SetTrue => "false".into(),
        ArgAction::Append => format!("[{}]", defaults.iter().map(|d| toml_scalar(d)).collect::<Vec<_>>().join(", ")),
        _ => defaults.first().map_or_else(|| format!("{}  # no default", placeholder()), |d| toml_scalar(d)),
    }
}

fn toml_scalar(s: &str) -> String {
    if s.parse::<i64>().is_ok() {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}
