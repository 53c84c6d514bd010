//! The deployment artifacts agree with the relay: the Kubernetes manifests under
//! `deploy/kubernetes/`, `docker-compose.yml` (with `deploy/nginx.conf`), the `Dockerfile` and
//! `.dockerignore`. Probes hit `/healthz` and `/readyz` on `server.listen`'s port, grace periods
//! outlast `server.shutdown_grace_ms`, pods run as non-root, every `RELAY_` variable is a real
//! key of `config/default.toml`, the defaults shown are the built-in ones, and the
//! configurations the manifests set are accepted by the relay's own `check-config`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

type Yaml = serde_norway::Value;
type Env = BTreeMap<String, String>;

const BINARY_IN_IMAGE: &str = "/usr/local/bin/userpilot-heap-relay";
const RELAY_IMAGE: &str = "userpilot-heap-relay:local";
/// Placeholders for the variables compose requires (`${VAR:?...}`).
const REQUIRED_IN_COMPOSE: [(&str, &str); 2] = [
    ("RELAY_USERPILOT__SECRETS", "compose-test-secret"),
    ("RELAY_HEAP__APP_ID", "compose-test-app"),
];
/// What the operator supplies in Kubernetes, which the shipped files leave empty.
const REQUIRED_IN_KUBERNETES: [(&str, &str); 2] = [
    ("RELAY_USERPILOT__SECRETS", "kubernetes-test-secret"),
    ("RELAY_HEAP__APP_ID", "kubernetes-test-app"),
];

// --- reading -------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// Every document of a YAML text, `<<` merge keys applied (compose uses them).
fn documents(text: &str, origin: &str) -> Vec<Yaml> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            let mut value = Yaml::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin} is not valid YAML: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{origin}: bad merge key: {e}"));
            value
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// One Kubernetes object and the file it came from.
struct Manifest {
    file: String,
    object: Yaml,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

fn kubernetes() -> Vec<Manifest> {
    let dir = root().join("deploy/kubernetes");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no manifests under {}", dir.display());
    files
        .iter()
        .flat_map(|path| {
            let file = path.strip_prefix(&dir).unwrap().display().to_string();
            let text = std::fs::read_to_string(path).unwrap();
            documents(&text, &file)
                .into_iter()
                .map(move |object| Manifest {
                    file: file.clone(),
                    object,
                })
        })
        .collect()
}

fn kind_of(object: &Yaml) -> &str {
    object["kind"].as_str().unwrap_or("")
}

fn name_of(object: &Yaml) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("")
}

fn all_of<'a>(manifests: &'a [Manifest], kind: &str) -> Vec<&'a Yaml> {
    manifests
        .iter()
        .map(|m| &m.object)
        .filter(|o| kind_of(o) == kind)
        .collect()
}

fn one<'a>(manifests: &'a [Manifest], kind: &str, name: &str) -> &'a Yaml {
    manifests
        .iter()
        .map(|m| &m.object)
        .find(|o| kind_of(o) == kind && name_of(o) == name)
        .unwrap_or_else(|| panic!("no {kind} named {name:?} in deploy/kubernetes"))
}

fn deployment(manifests: &[Manifest]) -> &Yaml {
    let deployments = all_of(manifests, "Deployment");
    assert_eq!(deployments.len(), 1, "expected one Deployment");
    deployments[0]
}

fn relay_container(deployment: &Yaml) -> &Yaml {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .and_then(|containers| containers.first())
        .expect("the Deployment has a container")
}

fn text(value: &Yaml) -> String {
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn string_map(value: &Yaml) -> Env {
    value
        .as_mapping()
        .map(|mapping| mapping.iter().map(|(k, v)| (text(k), text(v))).collect())
        .unwrap_or_default()
}

/// The Secret `kustomization.yaml` generates (`secretGenerator`) from env files the operator
/// creates; the repository ships each as `<file>.example`, which this reads.
fn generated_secret(manifests: &[Manifest], name: &str) -> Env {
    let kustomization = all_of(manifests, "Kustomization")[0];
    let generator = kustomization["secretGenerator"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|g| g["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no secretGenerator makes the Secret {name:?}"));
    let mut env = Env::new();
    for file in generator["envs"].as_sequence().into_iter().flatten() {
        let example = format!("deploy/kubernetes/{}.example", text(file));
        for line in read(&example).lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{example}: {line:?} is not KEY=value"));
            env.insert(key.to_owned(), value.to_owned());
        }
    }
    env
}

/// The environment the relay container gets as shipped: `envFrom` ConfigMaps and generated
/// Secrets, then `env`. The values the operator must supply are empty.
fn shipped_env(manifests: &[Manifest], container: &Yaml) -> Env {
    let mut env = Env::new();
    for source in container["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            env.extend(string_map(&one(manifests, "ConfigMap", name)["data"]));
        }
        if let Some(name) = source["secretRef"]["name"].as_str() {
            env.extend(generated_secret(manifests, name));
        }
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        if let Some(value) = var.get("value") {
            env.insert(text(&var["name"]), text(value));
        }
    }
    env
}

/// The shipped environment with the operator's required values filled in.
fn pod_env(manifests: &[Manifest], container: &Yaml) -> Env {
    let mut env = shipped_env(manifests, container);
    env.extend(REQUIRED_IN_KUBERNETES.map(|(k, v)| (k.to_owned(), v.to_owned())));
    env
}

/// A probe's or Service's port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Yaml, port: &Yaml) -> u64 {
    match port {
        Yaml::Number(n) => n.as_u64().expect("a port number"),
        Yaml::String(name) => container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("the container has no port named {name:?}")),
        other => panic!("unexpected port {other:?}"),
    }
}

fn compose() -> Yaml {
    let mut docs = documents(&read("docker-compose.yml"), "docker-compose.yml");
    assert_eq!(docs.len(), 1, "docker-compose.yml is one document");
    docs.remove(0)
}

fn compose_services(compose: &Yaml) -> Vec<(String, &Yaml)> {
    compose["services"]
        .as_mapping()
        .expect("compose has services")
        .iter()
        .map(|(name, service)| (text(name), service))
        .collect()
}

/// Compose services running the relay image.
fn compose_relays(compose: &Yaml) -> Vec<(String, &Yaml)> {
    let relays: Vec<_> = compose_services(compose)
        .into_iter()
        .filter(|(_, s)| s["image"].as_str() == Some(RELAY_IMAGE))
        .collect();
    assert!(!relays.is_empty(), "no compose service runs {RELAY_IMAGE}");
    relays
}

/// Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`.
fn interpolate(value: &str, vars: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .unwrap_or_else(|| panic!("unclosed ${{ in {value:?}"));
        let expression = &after[..end];
        let split = expression
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expression.len());
        let (name, operator) = expression.split_at(split);
        let set = vars.get(name).copied();
        let replacement = if let Some(default) = operator.strip_prefix(":-") {
            set.filter(|v| !v.is_empty()).unwrap_or(default).to_owned()
        } else if let Some(default) = operator.strip_prefix('-') {
            set.unwrap_or(default).to_owned()
        } else if operator.starts_with(":?") || operator.starts_with('?') {
            set.filter(|v| !v.is_empty())
                .unwrap_or_else(|| panic!("compose requires {name}: {operator}"))
                .to_owned()
        } else if operator.is_empty() {
            set.unwrap_or("").to_owned()
        } else {
            panic!("unsupported interpolation ${{{expression}}}");
        };
        out.push_str(&replacement);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn compose_vars() -> BTreeMap<&'static str, &'static str> {
    REQUIRED_IN_COMPOSE.into_iter().collect()
}

/// A compose service's environment, interpolated with only the required variables set.
fn compose_env(service: &Yaml) -> Env {
    let vars = compose_vars();
    string_map(&service["environment"])
        .into_iter()
        .map(|(k, v)| (k, interpolate(&v, &vars)))
        .collect()
}

/// `30s`, `1m30s`, `500ms` -> milliseconds.
fn duration_ms(value: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            "ms"
        } else {
            match c {
                'h' => "h",
                'm' => "m",
                's' => "s",
                _ => panic!("bad duration {value:?}"),
            }
        };
        let n: u64 = number
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {value:?}"));
        number.clear();
        total += n * match unit {
            "h" => 3_600_000,
            "m" => 60_000,
            "s" => 1000,
            _ => 1,
        };
    }
    assert!(number.is_empty(), "duration {value:?} lacks a unit");
    total
}

// --- the relay's own view ------------------------------------------------------------------

/// `config/default.toml`: section -> key -> default.
fn defaults() -> BTreeMap<String, toml::Table> {
    let table: toml::Table = read("config/default.toml").parse().unwrap();
    table
        .into_iter()
        .map(|(section, keys)| match keys {
            toml::Value::Table(keys) => (section, keys),
            other => panic!("[{section}] is not a table: {other:?}"),
        })
        .collect()
}

fn env_name(section: &str, key: &str) -> String {
    format!("RELAY_{}__{}", section.to_uppercase(), key.to_uppercase())
}

/// Every `RELAY_<SECTION>__<KEY>` the relay understands, with its default as an env value.
fn config_vars() -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (section, keys) in defaults() {
        for (key, default) in keys {
            let value = match default {
                toml::Value::String(s) => s,
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map_or_else(|| item.to_string(), str::to_owned)
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                toml::Value::Table(table) if table.is_empty() => String::new(),
                other => other.to_string(),
            };
            vars.insert(env_name(&section, &key), value);
        }
    }
    vars
}

/// Runs `check-config` with exactly `env` and returns the effective configuration.
fn check_config(env: &Env, origin: &str) -> toml::Table {
    let output = Command::new(env!("CARGO_BIN_EXE_userpilot-heap-relay"))
        .arg("check-config")
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the relay refuses the configuration of {origin}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().parse().unwrap()
}

fn setting<'a>(settings: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    settings
        .get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("check-config printed no {section}.{key}"))
}

fn socket(settings: &toml::Table, key: &str) -> SocketAddr {
    setting(settings, "server", key)
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn shutdown_grace_ms(settings: &toml::Table) -> u64 {
    setting(settings, "server", "shutdown_grace_ms")
        .as_integer()
        .unwrap() as u64
}

/// Every `RELAY_...` name in `text`, comments included (a commented example must be real too).
fn relay_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("RELAY_") {
        let glued = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if glued {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // A bare `RELAY_` is the prefix being talked about, not a variable.
        if name.len() > "RELAY_".len() {
            names.insert(name);
        }
    }
    names
}

fn kubernetes_texts() -> Vec<(String, String)> {
    let dir = root().join("deploy/kubernetes");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files
        .into_iter()
        .map(|path| {
            let name = path.display().to_string();
            (name, std::fs::read_to_string(path).unwrap())
        })
        .collect()
}

// --- Dockerfile ----------------------------------------------------------------------------

/// `(INSTRUCTION, arguments)` of the Dockerfile, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((word.to_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

/// The instructions of the last stage (the image that ships).
fn final_stage() -> Vec<(String, String)> {
    let all = dockerfile();
    let start = all.iter().rposition(|(i, _)| i == "FROM").expect("a FROM");
    all[start..].to_vec()
}

/// The JSON array after an exec-form instruction (or after `CMD` inside `HEALTHCHECK`).
fn exec_form(arguments: &str) -> Vec<String> {
    let start = arguments.find('[').expect("exec form");
    serde_json::from_str(&arguments[start..]).expect("a JSON array of strings")
}

// --- tests ---------------------------------------------------------------------------------

#[test]
fn every_kubernetes_manifest_parses_and_is_listed_in_the_kustomization() {
    let manifests = kubernetes();
    for manifest in &manifests {
        assert!(
            manifest.object["apiVersion"].as_str().is_some()
                && !kind_of(&manifest.object).is_empty(),
            "{} has a document without apiVersion or kind",
            manifest.file
        );
    }
    let kustomization = all_of(&manifests, "Kustomization");
    assert_eq!(kustomization.len(), 1, "one kustomization.yaml");
    let listed: BTreeSet<String> = kustomization[0]["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    let files: BTreeSet<String> = manifests
        .iter()
        .filter(|m| kind_of(&m.object) != "Kustomization")
        .map(|m| m.file.clone())
        .collect();
    assert_eq!(listed, files, "kustomization.yaml must list every manifest");
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    ] {
        assert!(!all_of(&manifests, kind).is_empty(), "no {kind} manifest");
    }
}

#[test]
fn kubernetes_configuration_is_accepted_by_the_relay() {
    let manifests = kubernetes();
    let container = relay_container(deployment(&manifests));
    let env = pod_env(&manifests, container);
    let settings = check_config(&env, "deploy/kubernetes");
    // The queue file sits on a mounted volume: the root filesystem is read-only.
    let path = setting(&settings, "queue", "path")
        .as_str()
        .unwrap()
        .to_owned();
    if setting(&settings, "queue", "backend").as_str() == Some("sqlite") {
        let mounted = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .any(|mount| Path::new(&path).starts_with(mount));
        assert!(mounted, "queue.path {path} is not on a mounted volume");
    }
    // The admin port must be reachable from outside the pod for Prometheus.
    let admin = socket(&settings, "admin_listen");
    assert!(
        admin.ip().is_unspecified(),
        "admin_listen {admin} is unreachable from outside the pod"
    );
    assert_eq!(
        resolve_port(container, &Yaml::from("admin")),
        u64::from(admin.port()),
        "the container port named admin is not server.admin_listen's port"
    );
}

#[test]
fn probes_check_healthz_and_readyz_on_the_port_the_relay_listens_on() {
    let manifests = kubernetes();
    let container = relay_container(deployment(&manifests));
    let settings = check_config(&pod_env(&manifests, container), "deploy/kubernetes");
    let listen = u64::from(socket(&settings, "listen").port());
    assert_eq!(listen, 8080);
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &container[probe]["httpGet"];
        if probe == "startupProbe" && container[probe].is_null() {
            continue;
        }
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(
            resolve_port(container, &get["port"]),
            listen,
            "{probe} port"
        );
    }
    // The public Service reaches the same port.
    let service = one(&manifests, "Service", name_of(deployment(&manifests)));
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1, "the public Service exposes one port");
    assert_eq!(ports[0]["port"].as_u64(), Some(80));
    assert_eq!(resolve_port(container, &ports[0]["targetPort"]), listen);
}

#[test]
fn termination_grace_outlasts_the_relays_shutdown_grace() {
    let manifests = kubernetes();
    let deployment = deployment(&manifests);
    let container = relay_container(deployment);
    let settings = check_config(&pod_env(&manifests, container), "deploy/kubernetes");
    let seconds = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds is set (the default, 30 s, is implicit)");
    assert!(
        seconds * 1000 > shutdown_grace_ms(&settings),
        "terminationGracePeriodSeconds {seconds} s does not outlast shutdown_grace_ms {}",
        shutdown_grace_ms(&settings)
    );

    let compose = compose();
    for (name, service) in compose_relays(&compose) {
        let settings = check_config(&compose_env(service), &name);
        let stop = service["stop_grace_period"]
            .as_str()
            .map_or(10_000, duration_ms);
        assert!(
            stop > shutdown_grace_ms(&settings),
            "{name}: stop_grace_period {stop} ms does not outlast shutdown_grace_ms {}",
            shutdown_grace_ms(&settings)
        );
    }
}

#[test]
fn pods_run_as_non_root_with_a_read_only_root_and_no_capabilities() {
    let manifests = kubernetes();
    let pod = &deployment(&manifests)["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_ne!(pod["securityContext"]["runAsUser"].as_u64(), Some(0));
    for container in pod["containers"].as_sequence().unwrap() {
        let name = text(&container["name"]);
        let security = &container["securityContext"];
        assert_eq!(security["runAsNonRoot"].as_bool(), Some(true), "{name}");
        assert_eq!(
            security["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        let dropped: Vec<String> = security["capabilities"]["drop"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        assert_eq!(dropped, ["ALL"], "{name} drops every capability");
        assert!(
            security["capabilities"]["add"].is_null(),
            "{name} adds no capability"
        );
        assert!(
            container["resources"]["limits"]["memory"]
                .as_str()
                .is_some(),
            "{name} has a memory limit"
        );
        assert!(
            container["resources"]["requests"]["memory"]
                .as_str()
                .is_some(),
            "{name} requests memory"
        );
    }
}

#[test]
fn the_sqlite_queue_has_one_writer_on_a_persistent_volume() {
    let manifests = kubernetes();
    let deployment = deployment(&manifests);
    let container = relay_container(deployment);
    let settings = check_config(&pod_env(&manifests, container), "deploy/kubernetes");
    assert_eq!(
        setting(&settings, "queue", "backend").as_str(),
        Some("sqlite")
    );
    assert_eq!(
        deployment["spec"]["replicas"].as_u64(),
        Some(1),
        "SQLite has one writer"
    );
    assert_eq!(
        deployment["spec"]["strategy"]["type"].as_str(),
        Some("Recreate"),
        "a rolling update would run two writers at once"
    );
    let path = setting(&settings, "queue", "path")
        .as_str()
        .unwrap()
        .to_owned();
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| Path::new(&path).starts_with(p))
        })
        .expect("the queue file is on a mount");
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mount has a volume");
    let claim = volume["persistentVolumeClaim"]["claimName"]
        .as_str()
        .expect("the queue volume is a PersistentVolumeClaim");
    let pvc = one(&manifests, "PersistentVolumeClaim", claim);
    let modes: Vec<String> = pvc["spec"]["accessModes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert_eq!(modes, ["ReadWriteOnce"]);
}

#[test]
fn admin_port_is_never_exposed_outside_the_private_network() {
    let manifests = kubernetes();
    let container = relay_container(deployment(&manifests));
    let admin = resolve_port(container, &Yaml::from("admin"));
    for service in all_of(&manifests, "Service") {
        let kind = service["spec"]["type"].as_str().unwrap_or("ClusterIP");
        for port in service["spec"]["ports"].as_sequence().unwrap() {
            if resolve_port(container, &port["targetPort"]) == admin {
                assert_eq!(
                    kind,
                    "ClusterIP",
                    "{} exposes the admin port",
                    name_of(service)
                );
            }
        }
    }

    let compose = compose();
    for (name, service) in compose_services(&compose) {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let published = interpolate(&text(port), &compose_vars());
            assert!(
                !published.ends_with(&format!(":{admin}")),
                "{name} publishes the admin port ({published})"
            );
        }
    }
    let nginx = read("deploy/nginx.conf");
    assert!(
        !nginx.contains(&format!(":{admin}")),
        "nginx proxies the admin port"
    );
}

/// `RELAY_SOURCES__<NAME>__<KEY>`: a key of a `[sources.<name>]` table (the names are the
/// operator's, so config/default.toml lists none), with a valid name.
fn is_source_variable(name: &str) -> bool {
    const SOURCE_KEYS: [&str; 4] = ["SECRETS", "APP_ID", "TOLERANCE_SECS", "IDENTITY"];
    name.strip_prefix("RELAY_SOURCES__")
        .and_then(|rest| rest.split_once("__"))
        .is_some_and(|(source, key)| {
            userpilot_heap_relay::config::SourceName::parse(&source.to_lowercase()).is_some()
                && SOURCE_KEYS.contains(&key)
        })
}

#[test]
fn every_relay_variable_named_is_a_real_config_key() {
    let known = config_vars();
    let mut sources = kubernetes_texts();
    sources.push(("docker-compose.yml".into(), read("docker-compose.yml")));
    sources.push(("Dockerfile".into(), read("Dockerfile")));
    for (file, content) in sources {
        for name in relay_names(&content) {
            assert!(
                known.contains_key(&name) || is_source_variable(&name),
                "{file} names {name}, which is no key of config/default.toml (the relay \
                 would refuse to start if it were set)"
            );
        }
    }
}

#[test]
fn every_config_key_is_shown_in_compose_and_in_kubernetes() {
    let compose = relay_names(&read("docker-compose.yml"));
    let kubernetes: BTreeSet<String> = kubernetes_texts()
        .iter()
        .flat_map(|(_, content)| relay_names(content))
        .collect();
    for name in config_vars().keys() {
        assert!(
            compose.contains(name),
            "docker-compose.yml does not show {name}"
        );
        assert!(
            kubernetes.contains(name),
            "deploy/kubernetes does not show {name}"
        );
    }
}

#[test]
fn shown_defaults_are_the_built_in_defaults() {
    let defaults = config_vars();
    // The deliberate departures, each explained beside it in the manifests.
    let departures = [
        "RELAY_SERVER__ADMIN_LISTEN",
        "RELAY_QUEUE__PATH",
        "RELAY_HEAP__APP_ID",
    ];

    let compose = compose();
    let relay = &compose["services"]["relay"];
    for (name, value) in string_map(&relay["environment"]) {
        if departures.contains(&name.as_str()) || value.contains(":?") {
            continue;
        }
        let shown = interpolate(&value, &BTreeMap::new());
        assert_eq!(
            shown, defaults[&name],
            "docker-compose.yml shows {name}={shown}"
        );
    }

    let manifests = kubernetes();
    for config_map in all_of(&manifests, "ConfigMap") {
        for (name, value) in string_map(&config_map["data"]) {
            if !departures.contains(&name.as_str()) {
                assert_eq!(value, defaults[&name], "the ConfigMap shows {name}={value}");
            }
        }
    }
}

#[test]
fn compose_relays_are_valid_configurations_that_check_their_own_health() {
    let compose = compose();
    let required: BTreeSet<String> = string_map(&compose["services"]["relay"]["environment"])
        .into_iter()
        .filter(|(_, value)| value.contains(":?"))
        .map(|(name, _)| name)
        .collect();
    let expected: BTreeSet<String> = REQUIRED_IN_COMPOSE
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(
        required, expected,
        "compose requires exactly what the relay requires"
    );

    for (name, service) in compose_relays(&compose) {
        let test: Vec<String> = service["healthcheck"]["test"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has no healthcheck"))
            .iter()
            .map(text)
            .collect();
        assert_eq!(
            test,
            ["CMD", BINARY_IN_IMAGE, "healthcheck"],
            "{name} healthcheck"
        );

        let settings = check_config(&compose_env(service), &name);
        let listen = socket(&settings, "listen").port();
        assert_eq!(listen, 8080, "{name} listens on 8080");
        if setting(&settings, "queue", "backend").as_str() == Some("sqlite") {
            let path = setting(&settings, "queue", "path")
                .as_str()
                .unwrap()
                .to_owned();
            let on_volume = service["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|v| text(v).split(':').nth(1).map(str::to_owned))
                .any(|target| Path::new(&path).starts_with(target));
            assert!(on_volume, "{name}: queue.path {path} is not on a volume");
        }
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let mapping = interpolate(&text(port), &compose_vars());
            assert!(
                mapping.ends_with(&format!(":{listen}")),
                "{name} publishes {mapping}, not its listen port"
            );
        }
    }
}

#[test]
fn replicas_share_postgres_behind_nginx_and_start_in_health_order() {
    let compose = compose();
    let in_profile = |service: &Yaml| {
        service["profiles"]
            .as_sequence()
            .is_some_and(|p| p.iter().any(|x| x.as_str() == Some("replicas")))
    };
    let services = compose_services(&compose);
    let default_relay = &compose["services"]["relay"];
    assert!(
        !in_profile(default_relay),
        "the default relay runs without a profile"
    );

    let replicas: Vec<&(String, &Yaml)> = services
        .iter()
        .filter(|(_, s)| in_profile(s) && s["image"].as_str() == Some(RELAY_IMAGE))
        .collect();
    assert_eq!(replicas.len(), 2, "two relay replicas");
    for (name, service) in &replicas {
        let env = compose_env(service);
        assert_eq!(env["RELAY_QUEUE__BACKEND"], "postgres", "{name}");
        assert!(
            env["RELAY_QUEUE__POSTGRES_URL"].contains("@postgres:5432/"),
            "{name}"
        );
        assert_eq!(
            service["depends_on"]["postgres"]["condition"].as_str(),
            Some("service_healthy"),
            "{name} waits for a healthy Postgres"
        );
    }
    assert!(in_profile(&compose["services"]["postgres"]));
    assert!(!compose["services"]["postgres"]["healthcheck"].is_null());

    let lb = &compose["services"]["lb"];
    assert!(in_profile(lb));
    assert!(
        !lb["healthcheck"].is_null(),
        "the load balancer checks itself"
    );
    let waited: BTreeSet<String> = lb["depends_on"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, d)| d["condition"].as_str() == Some("service_healthy"))
        .map(|(name, _)| text(name))
        .collect();
    let replica_names: BTreeSet<String> = replicas.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        waited, replica_names,
        "the load balancer waits for healthy replicas"
    );
    assert!(
        lb["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| text(v).starts_with("./deploy/nginx.conf:/etc/nginx/nginx.conf")),
        "the load balancer runs deploy/nginx.conf"
    );

    // nginx balances over exactly the replicas, on their listen port.
    let nginx = read("deploy/nginx.conf");
    let block = nginx
        .split_once("upstream relay {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .expect("an `upstream relay { ... }` block")
        .0;
    let upstream: BTreeSet<String> = block
        .lines()
        .filter_map(|line| line.trim().strip_prefix("server "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|target| target.trim_end_matches(';').to_owned())
        .collect();
    let expected: BTreeSet<String> = replica_names.iter().map(|n| format!("{n}:8080")).collect();
    assert_eq!(upstream, expected, "nginx upstream servers");
    assert!(
        nginx.contains("proxy_pass http://relay;"),
        "nginx proxies to the upstream"
    );
}

#[test]
fn kubernetes_ships_no_secret_and_leaves_the_required_values_empty() {
    let manifests = kubernetes();
    // `kubectl apply -k` would overwrite the real Secret with whatever a shipped one holds.
    assert!(
        all_of(&manifests, "Secret").is_empty(),
        "deploy/kubernetes ships a Secret object"
    );
    // Empty, the relay refuses to start; a placeholder would serve (or, for the app id, be
    // accepted by Heap silently).
    let shipped = shipped_env(&manifests, relay_container(deployment(&manifests)));
    for (name, _) in REQUIRED_IN_KUBERNETES {
        assert_eq!(
            shipped.get(name).map(String::as_str),
            Some(""),
            "deploy/kubernetes should show {name} with an empty value"
        );
    }
    let example = generated_secret(&manifests, "userpilot-heap-relay");
    for (name, value) in &example {
        assert!(
            value.is_empty(),
            "secret.env.example holds a value for {name}"
        );
    }
    // The file the operator fills in never gets committed.
    let ignored = read(".gitignore");
    assert!(
        ignored
            .lines()
            .any(|l| l.trim() == "deploy/kubernetes/secret.env"),
        ".gitignore does not list deploy/kubernetes/secret.env"
    );
}

#[test]
fn dockerfile_checks_health_with_the_relay_and_exposes_its_ports() {
    let stage = final_stage();
    let find = |instruction: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, args)| args.as_str())
            .collect()
    };

    let healthcheck = find("HEALTHCHECK");
    assert_eq!(healthcheck.len(), 1);
    let command = healthcheck[0]
        .split_once(" CMD ")
        .expect("HEALTHCHECK ... CMD [...]")
        .1;
    assert_eq!(exec_form(command), [BINARY_IN_IMAGE, "healthcheck"]);

    let entrypoint = find("ENTRYPOINT");
    assert_eq!(exec_form(entrypoint[0]), [BINARY_IN_IMAGE]);
    assert_eq!(exec_form(find("CMD")[0]), ["serve"]);

    // The image sets no listen address, so the built-in defaults decide the ports.
    let defaults = config_vars();
    let exposed: BTreeSet<&str> = find("EXPOSE")
        .iter()
        .flat_map(|args| args.split_whitespace())
        .collect();
    for key in ["RELAY_SERVER__LISTEN", "RELAY_SERVER__ADMIN_LISTEN"] {
        let port = defaults[key].rsplit(':').next().unwrap();
        assert!(exposed.contains(port), "EXPOSE lacks {port} ({key})");
    }
    assert!(exposed.contains("8080"));

    // The queue lives on the declared volume; the process is not root.
    let env = find("ENV").join(" ");
    let path = env
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix("RELAY_QUEUE__PATH="))
        .expect("ENV RELAY_QUEUE__PATH");
    let volumes: Vec<String> = find("VOLUME").iter().flat_map(|v| exec_form(v)).collect();
    assert!(
        volumes.iter().any(|v| Path::new(path).starts_with(v)),
        "{path} is not on a VOLUME ({volumes:?})"
    );
    let user = find("USER");
    let user = user.last().expect("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "the image runs as {user}");
}

#[test]
fn dockerignore_lets_in_everything_the_dockerfile_copies() {
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), ".dockerignore is an allowlist");
    let allowed: BTreeSet<&str> = rules
        .iter()
        .filter_map(|r| r.strip_prefix('!'))
        .map(|r| r.trim_end_matches('/'))
        .collect();
    let mut copied = 0;
    for (instruction, args) in dockerfile() {
        if instruction != "COPY" || args.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            copied += 1;
            assert!(
                allowed.contains(source.trim_end_matches('/')),
                "the Dockerfile copies {source}, which .dockerignore leaves out"
            );
        }
    }
    assert!(
        copied >= 4,
        "Cargo.toml, Cargo.lock, src and config are copied"
    );
    // The binary embeds config/default.toml at compile time.
    assert!(allowed.contains("config"));
}

/// The top-level folders of the files `src/` embeds at compile time: every
/// `include_str!`/`include_bytes!("...")` path (relative to the file naming it), and
/// `templates/` when a module uses askama's `#[template(path = ...)]`.
fn embedded_folders() -> BTreeSet<String> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let root = root();
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    let mut folders = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = &text[at + macro_name.len()..];
                let relative = &rest[..rest.find('"').unwrap()];
                let full = file.parent().unwrap().join(relative);
                let full = full.canonicalize().unwrap_or(full);
                let inside = full.strip_prefix(root.canonicalize().unwrap()).unwrap();
                let top = inside.components().next().unwrap();
                folders.insert(top.as_os_str().to_string_lossy().into_owned());
            }
        }
        if text.contains("#[template(path") {
            folders.insert("templates".to_owned());
        }
    }
    folders
}

#[test]
fn the_dockerfile_copies_every_folder_the_binary_embeds() {
    let copied: BTreeSet<String> = dockerfile()
        .into_iter()
        .filter(|(instruction, args)| instruction == "COPY" && !args.contains("--from="))
        .flat_map(|(_, args)| {
            let words: Vec<String> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .map(|w| w.trim_end_matches('/').to_owned())
                .collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    let embedded = embedded_folders();
    for folder in ["config", "templates", "assets"] {
        assert!(
            embedded.contains(folder),
            "{folder} is embedded: {embedded:?}"
        );
    }
    for folder in &embedded {
        assert!(
            copied.contains(folder),
            "the binary embeds files of {folder}/, which the Dockerfile does not copy"
        );
    }
}

#[test]
fn compose_interpolation_follows_composes_rules() {
    let vars: BTreeMap<&str, &str> = [("SET", "x"), ("EMPTY", "")].into_iter().collect();
    assert_eq!(interpolate("${SET:-d}", &vars), "x");
    assert_eq!(interpolate("${EMPTY:-d}", &vars), "d");
    assert_eq!(interpolate("${EMPTY-d}", &vars), "");
    assert_eq!(interpolate("${UNSET-d}", &vars), "d");
    assert_eq!(interpolate("a${SET}b${UNSET}c", &vars), "axbc");
    assert_eq!(interpolate("${SET:?required}", &vars), "x");
    assert!(
        std::panic::catch_unwind(|| interpolate("${UNSET:?required}", &BTreeMap::new())).is_err()
    );
    assert_eq!(duration_ms("30s"), 30_000);
    assert_eq!(duration_ms("1m30s"), 90_000);
    assert_eq!(duration_ms("500ms"), 500);
}
