//! Bad configuration files: every problem is reported at once, each with
//! its key (and where the value came from); nothing starts.

use kaelix_controlplane::config::{ConfigError, ConfigProblem};
use kaelix_controlplane::layers::ConfigLayers;

fn problems(text: &str, env: &[(&str, &str)]) -> Vec<ConfigProblem> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(&path, text).unwrap();
    let layers = ConfigLayers::new(Some(path))
        .with_env(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    match layers.resolve() {
        Ok(resolved) => panic!("accepted: {:?}", resolved.config),
        Err(ConfigError::Invalid { problems }) => problems,
        Err(other) => panic!("not a list of problems: {other}"),
    }
}

fn keys(problems: &[ConfigProblem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn wrong_types_out_of_range_and_unknown_keys_together() {
    let found = problems(
        r#"
[broker]
shards = "two"
data_addr = "not an address"
[dataplane]
backend = "rdma"
[dataplane.shard]
credit_window = 0
idle = { adaptive = { spin_cycles = -1 } }
[storage]
segment_size_mib = 3
retention_age_secs = 0
compression = "zstd"
[log]
level = "info,,=[x"
[metrics]
sample_interval_ms = 1
[admin]
addr = "127.0.0.1:7003"
[[streams]]
id = 1
durability = "quorum"
[[streams]]
id = 1
"#,
        &[],
    );
    let described: Vec<String> = found.iter().map(|p| p.to_string()).collect();
    let mut found_keys = keys(&found);
    found_keys.sort();
    assert_eq!(
        found_keys,
        vec![
            "broker.data_addr",
            "broker.shards",
            "dataplane.backend",
            "dataplane.shard.credit_window",
            "dataplane.shard.idle.adaptive.spin_cycles",
            "log.level",
            "metrics.addr",
            "metrics.sample_interval_ms",
            "storage.compression",
            "storage.retention_age_secs",
            "storage.segment_size_mib",
            "streams[0].durability",
            "streams[1].id",
        ],
        "{described:#?}"
    );
    let message = |key: &str| &found.iter().find(|p| p.key == key).unwrap().message;
    assert!(
        message("broker.shards").contains("\"two\""),
        "{described:#?}"
    );
    assert!(
        message("dataplane.backend").contains("rdma"),
        "{described:#?}"
    );
    assert!(
        message("dataplane.backend").contains("socket"),
        "{described:#?}"
    );
    assert!(
        message("storage.compression").contains("unknown key"),
        "{described:#?}"
    );
    assert!(
        message("storage.compression").contains("retention_mib"),
        "{described:#?}"
    );
    assert!(message("storage.segment_size_mib").contains("even number from 2 to 4096"));
    assert!(message("dataplane.shard.credit_window").contains("allowed: 1 to 1048576"));
    assert!(
        message("metrics.addr").contains("already used by admin.addr"),
        "{described:#?}"
    );
    assert!(
        message("streams[0].durability").contains("quorum"),
        "{described:#?}"
    );
    assert!(
        message("broker.data_addr").contains("\"not an address\""),
        "{described:#?}"
    );
    assert!(
        message("streams[1].id").contains("listed twice"),
        "{described:#?}"
    );
    assert!(
        found
            .iter()
            .filter(|p| p.key != "metrics.addr")
            .all(|p| p.origin.as_deref().is_some_and(|o| o.starts_with("file "))),
        "{described:#?}"
    );
}

#[test]
fn environment_values_are_checked_and_named() {
    let found = problems(
        "[broker]\nshards = 1\n",
        &[
            ("KAELIX__BROKER__SHARDS", "100"),
            ("KAELIX__STORAGE__FLUSH_INTERVAL_MS", "soon"),
            ("KAELIX__STORAGE__NOPE", "1"),
        ],
    );
    let described: Vec<String> = found.iter().map(|p| p.to_string()).collect();
    let origin = |key: &str| {
        found
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("{key}: {described:#?}"))
            .origin
            .clone()
    };
    assert_eq!(
        origin("broker.shards").as_deref(),
        Some("env KAELIX__BROKER__SHARDS")
    );
    assert_eq!(
        origin("storage.flush_interval_ms").as_deref(),
        Some("env KAELIX__STORAGE__FLUSH_INTERVAL_MS")
    );
    assert_eq!(
        origin("storage.nope").as_deref(),
        Some("env KAELIX__STORAGE__NOPE")
    );
    assert_eq!(found.len(), 3, "{described:#?}");
}

#[test]
fn broken_toml_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        "[broker]\nshards = 2\n[storage\nsegment_size_mib = 4\n",
    )
    .unwrap();
    let err = ConfigLayers::new(Some(path.clone())).resolve().unwrap_err();
    let ConfigError::Parse {
        path: reported,
        message,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(reported, &path);
    assert!(message.contains("line 3"), "{message}");
    let err = ConfigLayers::new(Some(dir.path().join("missing.toml")))
        .resolve()
        .unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}
