//! Redis as a trust boundary, through real processes: ACL users (the file in
//! docs/operations.md, verbatim) where the executor cannot publish, and TLS with a private
//! CA and with client certificates. Exchange → publisher → Redis → executor → bot.

mod common;

use common::exchange::ScriptedExchange;
use common::redis_extra::{roles_with, tls_files, CustomRedis};
use common::*;
use serde_json::{json, Value};

const TRADE: &str = r#"{"stream":"bnbbtc@trade","data":{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}"#;
const TICKER: &str = r#"{"stream":"bnbbtc@ticker","data":{"e":"24hrTicker","E":1672515782136,"s":"BNBBTC","p":"0.0015","P":"250.00","w":"0.0018","x":"0.0009","c":"0.0025","Q":"10","b":"0.0024","B":"10","a":"0.0026","A":"100","o":"0.0010","h":"0.0025","l":"0.0010","v":"10000","q":"18","O":0,"C":86400000,"F":0,"L":18150,"n":18151}}"#;

/// The ACL file block of docs/operations.md, as documented.
fn documented_acl() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let after = doc
        .split_once("<!-- acl-file")
        .expect("acl-file marker in docs/operations.md")
        .1;
    let block = after.split_once("```\n").expect("acl block start").1;
    block
        .split_once("```")
        .expect("acl block end")
        .0
        .to_string()
}

fn expected_trade() -> Value {
    json!({
        "type":"trade","exchange":"binance","symbol":"BNB-BTC","ts":1672515782136000u64,
        "trade_id":"12345","price":"0.001","size":"100","side":"sell"
    })
}

fn without_ts_recv(mut v: Value) -> Value {
    v.as_object_mut().expect("object").remove("ts_recv");
    v
}

/// Scripted exchange → publisher → `redis` → executor; a wildcard trade bot and an exact
/// ticker bot get exactly the events sent, and a late joiner the latest ticker.
async fn whole_path(
    publisher_url: &str,
    executor_url: &str,
    redis_extra: &str,
    numpat: impl Fn() -> u64,
) {
    let exchange = ScriptedExchange::start().await;
    let feed = sim_feed(
        exchange.port(),
        "binance",
        &["BNB-BTC"],
        &["trade", "ticker"],
    );
    let (publisher, executor) =
        roles_with(publisher_url, redis_extra, executor_url, redis_extra, &feed).await;
    wait_until("publisher subscribed to the exchange", WAIT, || async {
        exchange.subscribed_clients() > 0
    })
    .await;
    let mut trades = Bot::connect(&executor.bots_url()).await;
    trades.subscribe(&["trade:*:BNB-BTC"]).await;
    let mut tickers = Bot::connect(&executor.bots_url()).await;
    tickers.subscribe(&["ticker:binance:BNB-BTC"]).await;
    wait_until("executor pattern-subscribed", WAIT, || async {
        numpat() >= 1
    })
    .await;
    // The exact subscription goes in the same round trip as the pattern; one ping through
    // the bot protocol later it is in place too.
    tickers.send(json!({"op":"ping","req":1})).await;
    tickers.until(WAIT, |v| v["type"] == "pong").await;

    exchange.send(TRADE);
    exchange.send(TICKER);
    let (t, skipped) = trades.until(WAIT, |v| v["type"] == "trade").await;
    assert!(skipped.iter().all(|v| v["type"] != "ticker"), "{skipped:?}");
    assert_eq!(without_ts_recv(t), expected_trade());
    let (k, _) = tickers.until(WAIT, |v| v["type"] == "ticker").await;
    assert_eq!(k["last"], "0.0025", "{k}");

    // A late joiner's latest value comes through the executor's store connection (GET).
    let mut late = Bot::connect(&executor.bots_url()).await;
    late.subscribe(&["ticker:binance:BNB-BTC"]).await;
    let (k2, _) = late.until(WAIT, |v| v["type"] == "ticker").await;
    assert_eq!(k2["last"], "0.0025");

    // A book's store read also asks the log's size (MEMORY USAGE), stored or not.
    let mut books = Bot::connect(&executor.bots_url()).await;
    books.subscribe(&["book:binance:BNB-BTC"]).await;
    wait_until("the executor read the book's keys", WAIT, || async {
        executor
            .metric(r#"mdbridge_store_fetches_total{result="missing"}"#)
            .await
            >= 1.0
    })
    .await;

    // /health/redis uses the same credentials.
    let health = executor.get_json("/health/redis").await;
    assert_eq!(health["connected"], true, "{health}");

    assert_eq!(
        publisher.metric("mdbridge_redis_error_replies_total").await,
        0.0
    );
    assert_eq!(
        executor.metric("mdbridge_redis_error_replies_total").await,
        0.0
    );
    assert_eq!(
        executor.metric("mdbridge_redis_probe_timeouts_total").await,
        0.0
    );
}

fn redis_code(e: &redis::RedisError) -> String {
    e.code().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_acl_users_carry_the_whole_path_and_the_executor_cannot_publish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = documented_acl();
    assert!(acl.contains("user mdbridge-executor"), "{acl}");
    std::fs::write(
        dir.path().join("users.acl"),
        format!("{acl}user admin on >admin-pw ~* &* +@all\n"),
    )
    .expect("acl file");
    let redis = CustomRedis::start_in(dir, &["--aclfile".into(), "{dir}/users.acl".into()], false);
    let mut admin = redis.conn_as("admin", "admin-pw");

    // The executor's credentials cannot publish, nor write a key.
    let mut exec = redis.conn_as("mdbridge-executor", "CHANGE-ME-executor");
    let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg("md:trade:binance:BNB-BTC")
        .arg("forged")
        .query(&mut exec);
    let err = published.expect_err("an executor must not publish");
    assert_eq!(redis_code(&err), "NOPERM", "{err}");
    let set: redis::RedisResult<()> = redis::cmd("SET")
        .arg("md:last:ticker:binance:BNB-BTC")
        .arg("forged")
        .query(&mut exec);
    assert_eq!(redis_code(&set.expect_err("no SET")), "NOPERM");
    // Nor the default user, which the file turns off.
    let default: redis::RedisResult<String> =
        redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.port))
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query(&mut c));
    assert!(default.is_err(), "the default user is off");
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut admin)
        .expect("ACL LOG RESET");

    let port = redis.port;
    let pub_url = format!("redis://mdbridge-publisher:CHANGE-ME-publisher@127.0.0.1:{port}/0");
    let exec_url = format!("redis://mdbridge-executor:CHANGE-ME-executor@127.0.0.1:{port}/0");
    let numpat = || {
        let mut c = redis.conn_as("admin", "admin-pw");
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<u64>(&mut c)
            .unwrap_or(0)
    };
    whole_path(&pub_url, &exec_url, "max_patterns = 0", numpat).await;

    // Redis refused nothing the two roles sent: the file lists every command they use.
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut admin)
        .expect("ACL LOG");
    assert!(log.is_empty(), "ACL refusals: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let args = vec![
        "--tls-cert-file".to_string(),
        files.server_cert.display().to_string(),
        "--tls-key-file".into(),
        files.server_key.display().to_string(),
        "--tls-ca-cert-file".into(),
        files.ca.display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    let redis = CustomRedis::start_in(dir, &args, true);
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let ca = format!("tls_ca_file = \"{}\"", files.ca.display());

    // Without the private CA the certificate is not trusted: a clear start-up error.
    let (h, b) = (free_port(), free_port());
    let mut untrusted = Proc::role("executor", &role_config(&url, h, b, ""), h, Some(b));
    assert_ne!(untrusted.wait_exit().await, Some(0));
    assert!(
        untrusted.log().contains("cannot reach Redis"),
        "{}",
        untrusted.log()
    );

    let client = tls_client(&url, &files.ca, None);
    let numpat = move || {
        let mut c = client.get_connection().expect("tls admin connection");
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<u64>(&mut c)
            .unwrap_or(0)
    };
    whole_path(&url, &url, &ca, numpat).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_are_presented_when_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let args = vec![
        "--tls-cert-file".to_string(),
        files.server_cert.display().to_string(),
        "--tls-key-file".into(),
        files.server_key.display().to_string(),
        "--tls-ca-cert-file".into(),
        files.ca.display().to_string(),
        "--tls-auth-clients".into(),
        "yes".into(),
    ];
    let redis = CustomRedis::start_in(dir, &args, true);
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);

    // The server refuses a client without a certificate.
    let ca_only = format!("tls_ca_file = \"{}\"", files.ca.display());
    let (h, b) = (free_port(), free_port());
    let config = role_config(&url, h, b, "").replace("[redis]\n", &format!("[redis]\n{ca_only}\n"));
    let mut refused = Proc::role("executor", &config, h, Some(b));
    assert_ne!(refused.wait_exit().await, Some(0));
    assert!(
        refused.log().contains("cannot reach Redis"),
        "{}",
        refused.log()
    );

    let with_cert = format!(
        "tls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
        files.ca.display(),
        files.client_cert.display(),
        files.client_key.display()
    );
    let client = tls_client(
        &url,
        &files.ca,
        Some((&files.client_cert, &files.client_key)),
    );
    let numpat = move || {
        let mut c = client.get_connection().expect("tls admin connection");
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<u64>(&mut c)
            .unwrap_or(0)
    };
    whole_path(&url, &url, &with_cert, numpat).await;
}

/// The test's own TLS connection (to look at the server), trusting `ca`.
fn tls_client(
    url: &str,
    ca: &std::path::Path,
    cert: Option<(&std::path::Path, &std::path::Path)>,
) -> redis::Client {
    let read = |p: &std::path::Path| std::fs::read(p).expect("pem");
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: cert.map(|(c, k)| redis::ClientTlsConfig {
                client_cert: read(c),
                client_key: read(k),
            }),
            root_cert: Some(read(ca)),
        },
    )
    .expect("tls client")
}
