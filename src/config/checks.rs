//! Values an operator most likely did not mean: obvious placeholders (`REPLACE_ME`), a log
//! filter that would silence the relay, a Postgres URL whose password is a placeholder.

use reqwest::Url;

/// The shortest admin token accepted; webhook secrets shorter than this are only warned about
/// (the customer chose them in Userpilot: refusing one would stop a working deployment).
pub const MIN_SECRET_CHARS: usize = 16;

/// What the log filter's bare words may be, for the message.
const LEVELS: &str = "trace, debug, info, warn, error or off";

/// Words that are never a real secret, token or id, compared case-insensitively with the
/// trimmed value (contract §5.2). Besides these, [`is_placeholder`] refuses `replaceme` and
/// values starting with `replace_`, `replace-`, `your_` or `your-`, values in `<...>` or an unexpanded `${...}`, and values
/// made only of `x` (three or more).
const PLACEHOLDER_WORDS: [&str; 9] = [
    "changeme",
    "change_me",
    "change-me",
    "secret",
    "password",
    "todo",
    "tbd",
    "fixme",
    "placeholder",
];

/// Whether `value` is an obvious placeholder, such as the `REPLACE_ME` of a copied example.
pub fn is_placeholder(value: &str) -> bool {
    let value = value.trim().to_lowercase();
    PLACEHOLDER_WORDS.contains(&value.as_str())
        || value.starts_with("replace_")
        || value.starts_with("replace-")
        || value == "replaceme"
        || value.starts_with("your_")
        || value.starts_with("your-")
        || (value.starts_with('<') && value.ends_with('>'))
        || (value.starts_with("${") && value.ends_with('}'))
        || (value.len() >= 3 && value.chars().all(|c| c == 'x'))
}

/// `warn, hyper=info` -> `warn,hyper=info`: `tracing` takes the space as part of the target.
pub(super) fn tidy_filter(level: &str) -> String {
    let directives: Vec<&str> = level.split(',').map(str::trim).collect();
    directives.join(",")
}

/// Why `level` is not a log filter an operator meant, if it is not. `tracing`'s own parser
/// takes a bare word as a target name, so `verbose` would silence every line: here a bare
/// word must be a level, and a target is written `target=level`.
pub(super) fn log_filter_problem(level: &str) -> Option<String> {
    if level.trim().is_empty() {
        return Some(format!("is empty: use one of {LEVELS}"));
    }
    for directive in level.split(',').map(str::trim) {
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare
            && directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Some(format!(
                "has `{directive}`, which is not a level: use one of {LEVELS}, optionally \
                 with targets (`info,hyper=warn`, `userpilot_heap_relay=debug`)"
            ));
        }
    }
    // Events no directive matches are off: a filter of other targets only (`hyper=warn`)
    // would hide the relay's own lines, its warnings and errors included.
    let covers_the_relay = level.split(',').map(str::trim).any(|directive| {
        !directive.contains('=') && !directive.contains('[')
            || directive.starts_with(env!("CARGO_CRATE_NAME"))
    });
    if !covers_the_relay {
        return Some(format!(
            "`{level}` sets no level for the relay's own lines, so it would hide them all: add \
             one (`info,{level}`)"
        ));
    }
    match tracing_subscriber::EnvFilter::builder().parse(tidy_filter(level)) {
        Ok(_) => None,
        Err(error) => Some(format!(
            "is not a valid filter ({error}): use one of {LEVELS}, optionally with targets \
             (`info,hyper=warn`)"
        )),
    }
}

/// Whether a Postgres URL is a placeholder as a whole or by its password
/// (`postgres://relay:REPLACE_ME@db/relay`).
pub(super) fn postgres_url_is_placeholder(url: &str) -> bool {
    if is_placeholder(url) {
        return true;
    }
    let Ok(parsed) = Url::parse(url) else {
        return false;
    };
    parsed.password().is_some_and(|password| {
        let decoded = percent_decode(password);
        is_placeholder(&decoded)
    })
}

/// `%3C` -> `<`: the URL parser keeps the password percent-encoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
