//! The written forms of configuration values, for serde: durations in the unit their key
//! names, non-zero numbers, http(s) URLs, comma-separated lists from the environment. Each
//! refuses a bad value with a message that starts as validation's do ("must ...").

use std::num::NonZeroU64;

use serde::Deserialize;

/// A string with something in it.
pub(super) fn not_blank<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Err(serde::de::Error::custom("must not be blank"));
    }
    Ok(text)
}

/// A list written as a TOML array, or as one comma-separated string (the environment's form).
/// Values are kept as written: no number or boolean parsing, so an app id or a secret that
/// looks like a number stays exactly what the operator typed.
pub(super) fn comma_list<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Text(String),
    }
    Ok(match Either::deserialize(deserializer)? {
        Either::List(items) => items.into_iter().map(T::from).collect(),
        Either::Text(text) if text.is_empty() => Vec::new(),
        Either::Text(text) => text.split(',').map(|s| T::from(s.to_owned())).collect(),
    })
}

/// A non-zero integer, refused with a message naming the rule (serde's own names the type).
pub(super) fn non_zero<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<NonZeroU64>,
{
    let value = u64::deserialize(deserializer)?;
    let Some(value) = NonZeroU64::new(value) else {
        return Err(serde::de::Error::custom("must be above 0"));
    };
    T::try_from(value).map_err(|_| serde::de::Error::custom("must be a smaller number"))
}

/// A `Duration` written as whole milliseconds (`*_ms` keys).
pub(super) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

/// As [`millis`], refusing 0.
pub(super) mod non_zero_millis {
    use std::time::Duration;

    use serde::Deserializer;

    pub use super::millis::serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let millis: std::num::NonZeroU64 = super::non_zero(deserializer)?;
        Ok(Duration::from_millis(millis.get()))
    }
}

/// A `Duration` written as whole seconds (`*_secs` keys).
pub(super) mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_secs)
    }
}

/// An http(s) URL. Printed without the trailing `/` the parser adds to a bare host, so
/// `check-config` shows what was written.
pub(super) mod http_url {
    use reqwest::Url;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Url, serializer: S) -> Result<S::Ok, S::Error> {
        let text = value.as_str();
        serializer.serialize_str(if value.path() == "/" {
            text.trim_end_matches('/')
        } else {
            text
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Url, D::Error> {
        let text = String::deserialize(deserializer)?;
        match Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
            _ => Err(serde::de::Error::custom("must be an http(s) URL")),
        }
    }
}

/// As [`http_url`], with `""` for none.
pub(super) mod optional_http_url {
    use reqwest::Url;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Url>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(url) => super::http_url::serialize(url, serializer),
            None => serializer.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Url>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Ok(None);
        }
        match Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(Some(url)),
            _ => Err(serde::de::Error::custom("must be an http(s) URL or empty")),
        }
    }
}

/// As [`secs`], for a key that may be left out (`None`).
pub(super) mod optional_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => super::secs::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        u64::deserialize(deserializer).map(|secs| Some(Duration::from_secs(secs)))
    }
}

/// A Heap app id that may be unset: blank (the default) is `None`, printed back as `""`.
pub(super) mod optional_app_id {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::AppId;

    pub fn serialize<S: Serializer>(
        value: &Option<AppId>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(value.as_ref().map_or("", AppId::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<AppId>, D::Error> {
        let text = String::deserialize(deserializer)?;
        // Blank is unset: the top-level pair then defines no `default` source.
        Ok(AppId::try_from(text).ok())
    }
}
