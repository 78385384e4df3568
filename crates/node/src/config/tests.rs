//! The configuration's parsing and validation: defaults, the shipped example, and every refused
//! setting named in its error.

use super::*;

#[test]
fn shipped_example_config_parses_and_validates() {
    let text = include_str!("../../node.example.toml");
    let config = NodeConfig::from_toml(text).unwrap();
    config.validate().unwrap();
    assert_eq!(config.name, "node-1");
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let err = NodeConfig::from_toml("name = \"a\"\nlisten_addr = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("listen_addr"), "{err}");
}

#[test]
fn listen_backlog_defaults_to_4096_and_is_read() {
    assert_eq!(NodeConfig::new("a").listen_backlog, 4096);
    let config = NodeConfig::from_toml("name = \"a\"\nlisten_backlog = 16384").unwrap();
    assert_eq!(config.listen_backlog, 16384);
    let mut config = NodeConfig::new("a");
    config.listen_backlog = 0;
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("listen_backlog"), "{err}");
}

#[test]
fn cors_origins_default_to_any_for_the_list_and_none_for_publishing() {
    let config = NodeConfig::new("a");
    assert_eq!(config.cors_farm_origins, vec!["*"]);
    assert!(config.cors_publish_origins.is_empty());
    let mut config =
        NodeConfig::from_toml("name = \"a\"\ncors_publish_origins = [\"https://app.example.com\"]")
            .unwrap();
    config.validate().unwrap();
    config.cors_farm_origins = vec!["app.example.com".into()];
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("cors_farm_origins"), "{err}");
}

#[test]
fn relay_tls_settings_need_what_they_build_on() {
    let mut config = NodeConfig::from_toml("name = \"a\"\nrelay_mtls = true").unwrap();
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("relay_mtls"), "{err}");
    config.relay_mtls = false;
    config.relay_ca_file = Some("/nonexistent/ca.pem".into());
    let err = config.validate().unwrap_err();
    assert!(
        err.to_string().contains("relay_ca_file") && err.to_string().contains("tls_cert"),
        "{err}"
    );
}

#[test]
fn minimal_config_takes_defaults() {
    let config = NodeConfig::from_toml("name = \"a\"").unwrap();
    assert_eq!(config, NodeConfig::new("a"));
    config.validate().unwrap();
}

#[test]
fn stream_path_follows_the_url() {
    let mut config = NodeConfig::new("a");
    let bound: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(config.stream_path(bound), "/stream");
    config.url = Some("wss://push.example.com/live/ws".into());
    assert_eq!(config.stream_path(bound), "/live/ws");
    config.url = Some("ws://push.example.com".into());
    assert_eq!(config.stream_path(bound), "/");
}

#[test]
fn hostile_settings_are_refused_with_the_setting_named() {
    type Breaks = Box<dyn Fn(&mut NodeConfig)>;
    let cases: Vec<(&str, Breaks)> = vec![
        (
            "admin_token",
            Box::new(|c| c.admin_token = Some(String::new())),
        ),
        (
            "admin_token",
            Box::new(|c| c.admin_token = Some("  ".into())),
        ),
        ("max_connections", Box::new(|c| c.max_connections = 0)),
        ("name", Box::new(|c| c.name = "a b".into())),
        ("name", Box::new(|c| c.name = "a\nb".into())),
        ("name", Box::new(|c| c.name = "a\u{7}".into())),
        ("name", Box::new(|c| c.name = "a&node=b".into())),
        ("name", Box::new(|c| c.name = "x".repeat(200))),
        (
            "max_frame_bytes",
            Box::new(|c| c.max_frame_bytes = usize::MAX),
        ),
        ("join", Box::new(|c| c.join = vec!["127.0.0.1".into()])),
        ("join", Box::new(|c| c.join = vec!["host:99999".into()])),
        ("join", Box::new(|c| c.join = vec!["bad host:1".into()])),
        ("join", Box::new(|c| c.join = vec![":1".into()])),
        (
            "farm_secret",
            Box::new(|c| c.farm_secret = Some("short".to_string().into())),
        ),
        ("send_queue_bytes", Box::new(|c| c.send_queue_bytes = 10)),
        (
            "handshake_timeout_ms",
            Box::new(|c| c.handshake_timeout_ms = 0),
        ),
        ("relay", Box::new(|c| c.relay = "embeded".into())),
        (
            "relay",
            Box::new(|c| c.relay = "nats://a:b@h:1,nats://".into()),
        ),
        (
            "relay_subject_prefix",
            Box::new(|c| {
                c.relay = "nats://127.0.0.1:4222".into();
                c.relay_subject_prefix = Some("farm.>".into());
            }),
        ),
    ];
    for (field, break_it) in cases {
        let mut config = NodeConfig::new("a");
        break_it(&mut config);
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let mut config = NodeConfig::new("a");
    config.join = vec!["node-2.farm.example:7400".into(), "[::1]:7400".into()];
    config.validate().unwrap();
}

#[test]
fn the_farm_secret_comes_from_the_config_or_a_file_never_both_and_is_not_printed() {
    let mut config =
        NodeConfig::from_toml("name = \"a\"\nfarm_secret = \"0123456789abcdef-secret\"").unwrap();
    config.validate().unwrap();
    assert_eq!(
        config.farm_secret_bytes().unwrap().unwrap(),
        b"0123456789abcdef-secret"
    );
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
    let dir = std::env::temp_dir().join(format!("streamfarm-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("farm.secret");
    std::fs::write(&path, "from-a-file-0123456789\n").unwrap();
    config.farm_secret_file = Some(path.clone());
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("not both"), "{err}");
    config.farm_secret = None;
    assert_eq!(
        config.farm_secret_bytes().unwrap().unwrap(),
        b"from-a-file-0123456789"
    );
    config.farm_secret_file = Some(dir.join("missing"));
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("farm_secret_file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validation_names_the_bad_field() {
    let mut config = NodeConfig::new("a");
    config.failure_timeout_ms = 10;
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("failure_timeout_ms"), "{err}");
}

#[test]
fn a_node_reachable_from_other_machines_needs_a_secret_or_insecure() {
    // Loopback farms (the demo, the tests) start as they are.
    let mut config = NodeConfig::new("a");
    config.listen = "127.0.0.2:7400".parse().unwrap();
    config.validate().unwrap();
    for (listen, gossip) in [
        ("0.0.0.0:7400", None),
        ("10.0.0.1:7400", None),
        ("[::]:7400", None),
        ("127.0.0.1:7400", Some("0.0.0.0:7401")),
    ] {
        config.listen = listen.parse().unwrap();
        config.gossip = gossip.map(|g| g.parse().unwrap());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("--insecure"), "{err}");
        assert!(err.contains("streamfarm secret new"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        config.insecure = true;
        config.validate().unwrap();
        config.insecure = false;
        config.farm_secret = Some("0123456789abcdef-secret".to_string().into());
        config.validate().unwrap();
        config.farm_secret = None;
    }
    let config = NodeConfig::from_toml("name = \"a\"\ninsecure = true").unwrap();
    assert!(config.insecure);
}

#[test]
fn dns_needs_a_service_name_and_a_short_ttl() {
    let mut config = NodeConfig::from_toml("name = \"a\"\ndns = \"127.0.0.1:8600\"").unwrap();
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("service_name"), "{err}");
    config.service_name = Some("farm.test".into());
    config.validate().unwrap();
    let dns = config.dns_config().unwrap();
    assert_eq!(dns.ttl, streamfarm_dns::DEFAULT_TTL);
    config.dns_ttl = 2000;
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("dns_ttl"), "{err}");
    assert!(NodeConfig::new("a").dns_config().is_none());
}
