//! Reporting every problem of a configuration at once: the `config` crate's errors turned into
//! one line naming the key ([`describe`]), and how to get past each one (`Repair`) to look for
//! the next.

use config::{Map, Value, ValueKind};

/// Problems found while deserializing start with one of these words; [`describe`] then puts
/// the key first, as validation's messages read.
const PROBLEM_STARTS: [&str; 2] = ["must ", "is "];

/// The most problems reported for one configuration: past it the rest are likely one mistake.
pub(super) const MAX_PROBLEMS: usize = 50;

/// How to get past a problem found while deserializing, to look for the next one.
pub(super) enum Repair {
    /// An unknown key: leave it out.
    Remove(Vec<String>),
    /// A bad value: take the default instead (or leave the key out, when it has none).
    Reset(String),
    /// Cannot tell which key: stop looking.
    Stop,
}

impl Repair {
    /// Changes `tree`; false when nothing could be changed (so the same problem would recur).
    pub(super) fn apply(
        self,
        tree: &mut Map<String, Value>,
        defaults: &Map<String, Value>,
        reset: &mut std::collections::BTreeSet<String>,
    ) -> bool {
        match self {
            Repair::Remove(path) => {
                let Some((last, parents)) = path.split_last() else {
                    return false;
                };
                table_at(tree, parents).is_some_and(|table| table.remove(last).is_some())
            }
            Repair::Reset(key) => {
                let path: Vec<String> = key.split('.').map(str::to_owned).collect();
                let Some((last, parents)) = path.split_last() else {
                    return false;
                };
                // A default refused in its turn would recur: stop.
                if !reset.insert(key.clone()) {
                    return false;
                }
                let mut defaults = defaults.clone();
                let Some(value) =
                    table_at(&mut defaults, parents).and_then(|table| table.remove(last))
                else {
                    // A key without a default (one of a `[sources.<name>]` table) is optional
                    // to serde: leave it out.
                    return table_at(tree, parents)
                        .is_some_and(|table| table.remove(last).is_some());
                };
                match table_at(tree, parents) {
                    Some(table) => {
                        table.insert(last.clone(), value);
                        true
                    }
                    None => false,
                }
            }
            Repair::Stop => false,
        }
    }
}

/// The table at `path` inside `tree`, if every step is a table.
pub(super) fn table_at<'a>(
    tree: &'a mut Map<String, Value>,
    path: &[String],
) -> Option<&'a mut Map<String, Value>> {
    let mut table = tree;
    for step in path {
        match table.get_mut(step) {
            Some(Value {
                kind: ValueKind::Table(inner),
                ..
            }) => table = inner,
            _ => return None,
        }
    }
    Some(table)
}

/// Keys whose values must never be printed, not even in an error.
const SECRET_KEYS: [&str; 3] = ["userpilot.secrets", "admin.token", "queue.postgres_url"];

/// Whether `key` holds a secret: one of [`SECRET_KEYS`] or a source's `secrets`.
fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key)
        || key
            .strip_prefix("sources.")
            .is_some_and(|rest| rest.ends_with(".secrets"))
}

/// What a key of a fixed form accepts, for the error message (serde's own names the type).
const CHOICES: [(&str, &str); 4] = [
    ("log.format", "`json` or `pretty`"),
    ("queue.backend", "`sqlite` or `postgres`"),
    (
        "server.listen",
        "an address and port, such as `0.0.0.0:8080`",
    ),
    (
        "server.admin_listen",
        "an address and port, such as `127.0.0.1:9090`",
    ),
];

/// Turns the `config` crate's error into one line naming the key, and how to get past it.
/// Its messages put the key after "for key"; an unknown key reads "unknown field `x`" with the
/// section as the key. Serde quotes the offending value, so for secret keys the message is
/// replaced entirely.
pub(super) fn describe(error: &config::ConfigError) -> (String, Repair) {
    let text = error.to_string();
    let key = text
        .rsplit_once("for key `")
        .and_then(|(_, k)| k.split('`').next())
        .filter(|k| !k.is_empty());
    if let Some((_, rest)) = text.split_once("unknown field ") {
        let field = rest.split('`').nth(1).unwrap_or(rest);
        let mut path: Vec<String> = key
            .map(|k| k.split('.').map(str::to_owned).collect())
            .unwrap_or_default();
        path.push(field.to_owned());
        return (
            format!("unknown key `{}`", path.join(".")),
            Repair::Remove(path),
        );
    }
    let Some(key) = key else {
        return (text, Repair::Stop);
    };
    // `userpilot.secrets[1]`: the list is one key.
    let key = key.split('[').next().unwrap_or(key);
    let repair = Repair::Reset(key.to_owned());
    if is_secret_key(key) {
        return (
            format!("`{key}` has an invalid value (not shown: it is a secret)"),
            repair,
        );
    }
    if let Some((problem, _)) = text.split_once(" for key `")
        && PROBLEM_STARTS
            .iter()
            .any(|start| problem.starts_with(start))
    {
        return (format!("`{key}` {problem}"), repair);
    }
    // Serde would name the Rust type (`struct RawSource`).
    if key == "sources" {
        return (
            "`sources` must be a table of sources, each `[sources.<name>]` with `secrets` and \
             `app_id` (from the environment: RELAY_SOURCES__<NAME>__<KEY>)"
                .to_owned(),
            repair,
        );
    }
    if let Some(name) = key.strip_prefix("sources.")
        && !name.contains('.')
    {
        return (
            format!(
                "`{key}` must be a table with `secrets` and `app_id` (from the environment: \
                 RELAY_SOURCES__{}__SECRETS and RELAY_SOURCES__{}__APP_ID)",
                name.to_uppercase(),
                name.to_uppercase()
            ),
            repair,
        );
    }
    if let Some((_, choices)) = CHOICES.iter().find(|(k, _)| *k == key) {
        return (format!("`{key}` must be {choices}"), repair);
    }
    // "invalid type: string \"soon\", expected an integer for key `k` in the environment"
    if let Some(rest) = text.strip_prefix("invalid type: ")
        && let Some((found, rest)) = rest.split_once(", expected ")
        && let Some((expected, _)) = rest.split_once(" for key `")
    {
        return (format!("`{key}` must be {expected}, not {found}"), repair);
    }
    (text, repair)
}
