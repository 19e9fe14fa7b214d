//! The deployment files are well formed: docker-compose.yml has every service, health checks
//! and dependencies that exist, and every duet command it runs is one the binary knows.

use std::collections::BTreeSet;

use crate::common::*;

fn compose() -> serde_yaml::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"),
    )
    .unwrap();
    serde_yaml::from_str(&text).expect("docker-compose.yml is YAML")
}

#[test]
fn compose_file_structure() {
    let doc = compose();
    let services = doc["services"].as_mapping().expect("a services map");
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    for required in [
        "kafka",
        "kafka-init",
        "redis",
        "minio",
        "minio-init",
        "speed",
        "serve",
        "batch",
        "check",
    ] {
        assert!(
            names.contains(required),
            "service {required} missing: {names:?}"
        );
    }
    let kafka = &doc["services"]["kafka"];
    assert!(
        kafka["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka:"),
        "official image"
    );
    assert!(
        kafka["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .unwrap()
            .contains("controller"),
        "KRaft mode"
    );
    let redis_cmd = serde_yaml::to_string(&doc["services"]["redis"]["command"]).unwrap();
    assert!(
        redis_cmd.contains("--appendonly") && redis_cmd.contains("yes"),
        "Redis persists: {redis_cmd}"
    );
    for svc in ["kafka", "redis", "minio", "speed", "serve"] {
        assert!(
            doc["services"][svc]["healthcheck"]["test"].is_sequence(),
            "{svc} has a health check"
        );
    }
    for (name, svc) in services {
        if let Some(deps) = svc["depends_on"].as_mapping() {
            for dep in deps.keys() {
                let dep = dep.as_str().unwrap();
                assert!(
                    names.contains(dep),
                    "{} depends on unknown service {dep}",
                    name.as_str().unwrap()
                );
            }
        }
    }
    // The long-running duet services run commands the binary has.
    for (svc, args) in [("speed", vec!["speed", "run"]), ("serve", vec!["serve"])] {
        let cmd: Vec<String> = doc["services"][svc]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(cmd[..args.len()], args[..], "{svc}");
        let mut help: Vec<&str> = args.clone();
        help.push("--help");
        expect_status(&run(&help), 0);
    }
    // The cron'd services call duet batch run and duet check.
    let batch = serde_yaml::to_string(&doc["services"]["batch"]["command"]).unwrap();
    assert!(batch.contains("duet batch run --as-of"), "{batch}");
    let check = serde_yaml::to_string(&doc["services"]["check"]["command"]).unwrap();
    assert!(check.contains("duet check"), "{check}");
}
