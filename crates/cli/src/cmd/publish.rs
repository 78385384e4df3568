//! `streamfarm pub SERVICE TOPIC MESSAGE`: publish one message farm-wide
//! (`POST /publish/{topic}` on the first server of the service that accepts it).

use std::process::ExitCode;

use streamfarm_client::ServiceAddress;

use super::list::ClientArgs;

/// Arguments of `streamfarm pub`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service: a URL, `host:port` (all its addresses), or a comma-separated seed list.
    service: ServiceAddress,
    /// The topic to publish on.
    topic: String,
    /// The message; `-` reads it from standard input.
    message: String,
    #[command(flatten)]
    client: ClientArgs,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let payload = if args.message == "-" {
        use tokio::io::AsyncReadExt;
        let mut buffer = Vec::new();
        tokio::io::stdin().read_to_end(&mut buffer).await?;
        buffer
    } else {
        args.message.into_bytes()
    };
    let options = args.client.options()?;
    let via = streamfarm_client::publish(&args.service, &options, &args.topic, payload).await?;
    tracing::debug!(%via, topic = %args.topic, "published");
    Ok(ExitCode::SUCCESS)
}
