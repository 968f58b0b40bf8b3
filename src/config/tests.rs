//! Unit tests of `config` (kept apart so the module itself stays readable).

use super::*;
use std::io::Write;

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn shipped_config_is_the_documented_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let shipped = Config::load(Some(&path), Role::Hybrid).unwrap();
    let expected = Config {
        feeds: vec![FeedConfig::new(
            Exchange::Binance,
            vec!["BTC-USDT".into(), "ETH-USDT".into()],
            vec![
                FeedChannel::Trade,
                FeedChannel::Ticker,
                FeedChannel::Book,
                FeedChannel::Candle("1m".into()),
            ],
        )],
        ..Config::default()
    };
    assert_eq!(shipped, expected);
}

#[test]
fn every_problem_is_reported_with_file_key_and_reason() {
    let f = write(
        r#"
[redis]
url = "http://nope"
publish_queue_size = 0
[bots]
listen = "not-an-address"
[[feeds]]
exchange = "binance"
symbols = ["btcusdt"]
channels = ["trade"]
depth_limit = 0
"#,
    );
    let err = Config::load(Some(f.path()), Role::Hybrid).unwrap_err();
    let file = f.path().display().to_string();
    let text = err.to_string();
    for key in [
        "redis.url",
        "redis.publish_queue_size",
        "bots.listen",
        "feeds[0].symbols",
        "feeds[0].depth_limit",
    ] {
        assert!(
            err.problems
                .iter()
                .any(|p| p.starts_with(&format!("{file}: {key}: "))),
            "{key} missing in:\n{text}"
        );
    }
    assert_eq!(err.problems.len(), 5, "{text}");
}

#[test]
fn unknown_keys_and_wrong_types_are_refused() {
    let f = write("[redis]\nurll = \"redis://x\"\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.problems[0].contains("redis"), "{err}");
    assert!(err.problems[0].contains("urll"), "{err}");

    let f = write("[bots]\nqueue_size = \"big\"\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.problems[0].contains("bots.queue_size"), "{err}");

    let f = write("[bots]\nslow_client = \"ignore\"\n");
    assert!(Config::load(Some(f.path()), Role::Executor).is_err());

    let f = write(
        "[[feeds]]\nexchange = \"binance\"\nsymbols = [\"BTC-USDT\"]\nchannels = [\"candle:7m\"]\n",
    );
    let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
    assert!(
        err.to_string().contains("candle:7m`: Binance klines"),
        "{err}"
    );

    let f = write(
        "[[feeds]]\nexchange = \"binance\"\nsymbols = [\"BTC-USDT\"]\nchannels = [\"candle:7q\"]\n",
    );
    let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
    assert!(err.to_string().contains("candle:7q"), "{err}");
}

#[test]
fn bot_tokens_are_plain_or_scoped_and_allow_patterns_are_checked() {
    let f = write(
        r#"
[bots]
tokens = ["plain", { token = "scoped", allow = ["trade:*:*", "book:binance:*"] }]
max_requests_per_sec = 2.5
"#,
    );
    let c = Config::load(Some(f.path()), Role::Executor).unwrap();
    assert_eq!(
        c.bots.tokens,
        vec![
            BotToken::Any("plain".into()),
            BotToken::Scoped(ScopedToken {
                token: "scoped".into(),
                allow: vec!["trade:*:*".into(), "book:binance:*".into()],
            }),
        ]
    );
    assert_eq!(c.bots.max_requests_per_sec, 2.5);

    let f = write(
        r#"
[bots]
tokens = ["a", "a", { token = "b", allow = ["trade:nyse:*"] }, { token = "c", allow = [] }]
max_requests_per_sec = 0
tls_cert_file = "/nonexistent/cert.pem"
"#,
    );
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    let text = err.to_string();
    for key in [
        "bots.tokens[1]: the same token",
        "bots.tokens[2].allow[0]: `trade:nyse:*`",
        "bots.tokens[3].allow: an empty allow list",
        "bots.max_requests_per_sec",
        "bots.tls_cert_file: tls_cert_file and tls_key_file",
    ] {
        assert!(text.contains(key), "{key} missing in:\n{text}");
    }

    let f = write("[bots]\ntokens = [{ token = \"x\", alow = [] }]\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.to_string().contains("bots.tokens"), "{err}");
}

#[test]
fn redis_tls_files_need_rediss_and_go_in_pairs() {
    let f = write("[redis]\nurl = \"redis://h:6379/0\"\ntls_ca_file = \"/ca.pem\"\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(
        err.to_string()
            .contains("redis.tls_ca_file: needs a rediss:// url"),
        "{err}"
    );
    let f = write("[redis]\nurl = \"rediss://h:6380/0\"\ntls_cert_file = \"/c.pem\"\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.to_string().contains("go together"), "{err}");
    let f = write(
            "[redis]\nurl = \"rediss://u:p@h:6380/0\"\ntls_ca_file = \"/ca.pem\"\ntls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\"\nmax_patterns = 0\n",
        );
    let config = Config::load(Some(f.path()), Role::Executor).unwrap();
    assert_eq!(config.redis.max_patterns, 0);
    assert_eq!(
        config.redis.tls_key_file.as_deref(),
        Some(Path::new("/k.pem"))
    );
}

#[test]
fn signing_keys_parse_are_checked_and_never_shown() {
    let f = write(
            "[redis]\nsigning_keys = [\"k1=0123456789abcdef-new\", \"k0=0123456789abcdef-old\"]\nmax_envelope_bytes = 4096\n",
        );
    let config = Config::load(Some(f.path()), Role::Executor).unwrap();
    let keys = &config.redis.signing_keys;
    assert_eq!(keys.len(), 2);
    assert_eq!(
        (keys[0].kid(), keys[0].secret()),
        ("k1", "0123456789abcdef-new")
    );
    assert_eq!(config.redis.max_envelope_bytes, 4096);
    let shown = format!("{config:?}");
    assert!(shown.contains("SigningKey(k1=***)"), "{shown}");
    assert!(!shown.contains("0123456789abcdef"), "{shown}");

    for (text, want) in [
        ("[\"k1\"]", "expected `kid=secret`"),
        ("[\"k1=short\"]", "shorter than 16 bytes"),
        ("[\"k 1=0123456789abcdef\"]", "key id"),
        (
            "[\"k1=0123456789abcdef\", \"k1=0123456789abcdef-2\"]",
            "listed twice",
        ),
    ] {
        let f = write(&format!("[redis]\nsigning_keys = {text}\n"));
        let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("redis.signing_keys"), "{msg}");
        assert!(msg.contains(want), "{msg}");
        assert!(!msg.contains("0123456789abcdef"), "secret in: {msg}");
        assert!(!msg.contains("short\""), "secret in: {msg}");
    }
    let f = write("[redis]\nmax_envelope_bytes = 10\n");
    assert!(Config::load(Some(f.path()), Role::Executor)
        .unwrap_err()
        .to_string()
        .contains("redis.max_envelope_bytes"));
}

#[test]
fn redis_sentinels_and_master_name_go_together_and_must_be_urls() {
    let f = write("[redis]\nsentinels = [\"redis://h:26379\"]\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.to_string().contains("go together"), "{err}");
    let f = write("[redis]\nmaster_name = \"m\"\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.to_string().contains("go together"), "{err}");
    let f = write(
        "[redis]\nmaster_name = \"m\"\nsentinels = [\"redis://h:26379\", \"http://:secret@h\"]\n",
    );
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("entry 1 is not a Redis URL"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    let f = write(
            "[redis]\nmaster_name = \"m\"\nsentinels = [\"redis://u:p@h1:26379\", \"redis://h2:26379\"]\n",
        );
    let config = Config::load(Some(f.path()), Role::Executor).unwrap();
    assert_eq!(config.redis.master_name, "m");
    assert_eq!(config.redis.sentinels.len(), 2);
}

#[test]
fn durable_section_is_validated_key_by_key() {
    let f = write(
        "[durable]\nchannels = [\"trade:*:*\", \"trade:*\"]\nmaxlen = 0\nmax_deliveries = 0\n\
         [[durable.limits]]\npattern = \"book\"\nmaxlen = 0\n",
    );
    let err = Config::load(Some(f.path()), Role::Publisher)
        .unwrap_err()
        .to_string();
    for key in [
        "durable.channels[1]",
        "durable.maxlen",
        "durable.max_deliveries",
        "durable.limits[0].pattern",
        "durable.limits[0].maxlen",
    ] {
        assert!(err.contains(key), "{key} missing in {err}");
    }
    assert!(!err.contains("durable.channels[0]"), "{err}");

    let f = write(
        "[durable]\nchannels = [\"trade:*:*\"]\n[[durable.limits]]\npattern = \"trade:binance:*\"\nmaxlen = 10\napproximate = false\n",
    );
    let c = Config::load(Some(f.path()), Role::Executor).unwrap();
    assert_eq!(c.durable.channels, vec!["trade:*:*".to_string()]);
    assert_eq!(c.durable.limits[0].approximate, Some(false));
}

#[test]
fn latest_ttl_must_outlive_the_refresh_or_be_off() {
    let f = write("[redis]\nsnapshot_interval_ms = 1000\nlatest_ttl_ms = 1500\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert!(err.to_string().contains("redis.latest_ttl_ms"), "{err}");
    for ok in ["latest_ttl_ms = 0", "latest_ttl_ms = 2000"] {
        let f = write(&format!("[redis]\nsnapshot_interval_ms = 1000\n{ok}\n"));
        assert!(Config::load(Some(f.path()), Role::Executor).is_ok(), "{ok}");
    }
    let f = write("[redis]\nbooklog_max = 0\nmax_snapshot_bytes = 0\n");
    let err = Config::load(Some(f.path()), Role::Executor).unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
}

#[test]
fn missing_file_and_missing_feeds() {
    let err = Config::load(
        Some(Path::new("/nonexistent/mdbridge.toml")),
        Role::Executor,
    )
    .unwrap_err();
    assert!(err.to_string().contains("file not found"));
    let f = write("");
    let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
    assert!(err.to_string().contains("feeds"), "{err}");
    assert!(Config::load(Some(f.path()), Role::Executor).is_ok());
}

#[test]
fn admin_and_log_settings_are_checked() {
    let f = write(
            "[http]\nmax_connections = 0\nheader_timeout_ms = 0\ntoken = \" \"\n[log]\nlevel = \"info,[\"\nformat = \"json\"\n",
        );
    let text = Config::load(Some(f.path()), Role::Executor)
        .unwrap_err()
        .to_string();
    for key in [
        "http.max_connections",
        "http.header_timeout_ms",
        "http.token",
        "log.level",
    ] {
        assert!(
            text.contains(&format!(": {key}: ")),
            "{key} missing in {text}"
        );
    }
    let f = write("[log]\nformat = \"xml\"\n");
    let text = Config::load(Some(f.path()), Role::Executor)
        .unwrap_err()
        .to_string();
    assert!(text.contains("log.format"), "{text}");
    let f = write(
        "[http]\ntoken = \"t0k\"\n[log]\nformat = \"json\"\nlevel = \"mdbridge=debug,info\"\n",
    );
    let c = Config::load(Some(f.path()), Role::Executor).unwrap();
    assert_eq!(c.http.token.as_deref(), Some("t0k"));
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn coinbase_feeds_take_5_minute_candles_only_and_their_own_label() {
    let ok = write(
        "[[feeds]]\nexchange = \"coinbase\"\nlabel = \"sim\"\nsymbols = [\"BTC-USD\"]\nchannels = [\"trade\", \"ticker\", \"book\", \"candle:5m\"]\n",
    );
    let config = Config::load(Some(ok.path()), Role::Publisher).expect("valid");
    assert_eq!(config.feeds[0].label, Some(Exchange::Sim));
    assert_eq!(config.feeds[0].max_message_bytes, 16 * 1024 * 1024);
    let f = write(
        "[[feeds]]\nexchange = \"coinbase\"\nsymbols = [\"BTC-USD\"]\nchannels = [\"candle:1m\"]\n",
    );
    let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(
        err.problems[0].ends_with(
            "feeds[0].channels: `candle:1m`: the Coinbase candles channel serves 5-minute candles only: 5m"
        ),
        "{err}"
    );
    let f = write(
        "[[feeds]]\nexchange = \"kraken\"\nsymbols = [\"BTC-USD\"]\nmax_message_bytes = 10\n",
    );
    let err = Config::load(Some(f.path()), Role::Publisher).unwrap_err();
    assert!(
        err.to_string()
            .contains("`kraken` is not supported yet (supported: binance, coinbase)"),
        "{err}"
    );
    assert!(
        err.to_string().contains("feeds[0].max_message_bytes"),
        "{err}"
    );
}
