//! The request handler: one query in, one answer out, from the current [`Zone`].
//!
//! hickory-server decodes the packet (a packet it cannot decode never reaches us: garbage gets no
//! answer, a header with a broken body gets FORMERR) and calls [`FarmHandler::handle_request`].
//! The work here is a few comparisons and a slice rotation; the only await is the send. The zone
//! is an `Arc` cloned out of a `watch`, so no lock is held while answering.

use std::sync::Arc;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::sync::{Semaphore, watch};
use tracing::debug;

use crate::zone::{Rotation, Zone};

/// Largest UDP payload we offer with EDNS: the DNS flag day 2020 value, which avoids IP
/// fragmentation on ordinary paths. Bigger answers are truncated and the client retries on TCP.
const MAX_UDP_PAYLOAD: u16 = 1232;

/// Answers queries from the latest zone.
pub(crate) struct FarmHandler {
    zone: watch::Receiver<Arc<Zone>>,
    rotation: Rotation,
    /// Bounds the requests being answered at once. hickory spawns a task per UDP packet and per
    /// TCP connection without a limit; past this many in flight we drop queries unanswered (the
    /// client retries), so a flood costs a bounded amount of the node's runtime.
    in_flight: Semaphore,
}

impl FarmHandler {
    /// A handler over `zone`, answering at most `max_in_flight` requests at once.
    pub(crate) fn new(zone: watch::Receiver<Arc<Zone>>, max_in_flight: usize) -> Self {
        FarmHandler {
            zone,
            rotation: Rotation::default(),
            in_flight: Semaphore::new(max_in_flight),
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for FarmHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            debug!(src = %request.src(), "too many DNS requests in flight; dropped");
            return not_sent(&request.metadata, ResponseCode::Refused);
        };

        // RFC 6891: answer EDNS with EDNS; we speak version 0 only.
        let mut response_edns = None;
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            ours.set_version(0);
            response_edns = Some(ours);
            if edns.version() > 0 {
                return send_error(
                    request,
                    response_edns.as_ref(),
                    ResponseCode::BADVERS,
                    response_handle,
                )
                .await;
            }
        }
        let edns = response_edns.as_ref();

        if request.metadata.op_code != OpCode::Query {
            return send_error(request, edns, ResponseCode::NotImp, response_handle).await;
        }
        let info = match request.request_info() {
            Ok(info) => info,
            // Zero or several questions: nobody sends those on purpose.
            Err(_) => {
                return send_error(request, edns, ResponseCode::FormErr, response_handle).await;
            }
        };
        let query = info.query;
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return send_error(request, edns, ResponseCode::Refused, response_handle).await;
        }

        // Clone the Arc and let the watch's read guard go at once: nothing is held across the send.
        let zone = Arc::clone(&self.zone.borrow());
        let answer = zone.lookup(query.name(), query.query_type(), &self.rotation);

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = answer.authoritative;
        metadata.response_code = answer.code;
        let response = MessageResponseBuilder::new(&request.queries, edns).build(
            metadata,
            answer.answers,
            None::<&Record>,
            answer.soa,
            answer.additionals,
        );
        send(request, response, response_handle).await
    }
}

/// Sends an answer with no records and this code.
async fn send_error<R: ResponseHandler>(
    request: &Request,
    edns: Option<&Edns>,
    code: ResponseCode,
    response_handle: R,
) -> ResponseInfo {
    let response =
        MessageResponseBuilder::new(&request.queries, edns).error_msg(&request.metadata, code);
    send(request, response, response_handle).await
}

async fn send<'a, R: ResponseHandler>(
    request: &Request,
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    mut response_handle: R,
) -> ResponseInfo {
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            // The client went away (TCP closed) or the send queue is full: nothing to retry.
            debug!(src = %request.src(), %error, "DNS answer not sent");
            not_sent(&request.metadata, ResponseCode::ServFail)
        }
    }
}

/// The record of an answer that was not sent, for hickory's bookkeeping.
fn not_sent(request: &Metadata, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(request);
    metadata.response_code = code;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}
