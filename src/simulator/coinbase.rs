//! stub
use super::SimConfig;
use tokio_util::sync::CancellationToken;
pub async fn serve_coinbase(
    _listener: tokio::net::TcpListener,
    _config: SimConfig,
    _shutdown: CancellationToken,
) -> std::io::Result<()> {
    Ok(())
}
