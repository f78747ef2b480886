//! openraft's network over tonic: the client side ([`NetworkFactory`],
//! one [`NetworkClient`] per peer) and the server side ([`RaftService`]).
//!
//! openraft's messages travel as serde JSON inside `proto/cluster.proto`'s
//! envelopes; snapshot chunks carry raw bytes. Both sides raise tonic's
//! 4 MiB message limit to [`MESSAGE_BYTES_MAX`] so snapshots fit.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::node::{self, Local, ProposeError};
use super::pb::cluster_raft_client::ClusterRaftClient;
use super::pb::cluster_raft_server::ClusterRaft;
use super::pb::{
    ClusterStream, InitRequest, JoinRequest, LeaveRequest, Member, MembershipReply, RaftMessage,
    SnapshotChunk, StatusReply, StatusRequest,
};
use super::{MemberAddr, NodeId, Raft, TypeConfig};

/// Largest gRPC message either side accepts or sends (tonic's default of
/// 4 MiB is too small for snapshots).
pub const MESSAGE_BYTES_MAX: usize = 256 << 20;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A lazily connecting client for the cluster RPCs at `addr` (`host:port`).
pub fn client(addr: &str) -> Result<ClusterRaftClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(ClusterRaftClient::new(channel)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<RaftMessage, serde_json::Error> {
    Ok(RaftMessage {
        json: serde_json::to_vec(value)?,
    })
}

pub(crate) fn decode<T: DeserializeOwned>(msg: &RaftMessage) -> Result<T, serde_json::Error> {
    serde_json::from_slice(&msg.json)
}

/// Creates one [`NetworkClient`] per peer for openraft.
#[derive(Debug, Clone, Default)]
pub struct NetworkFactory;

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &MemberAddr) -> Self::Network {
        NetworkClient {
            target,
            node: node.clone(),
            client: client(&node.raft_addr).map_err(|e| e.to_string()),
        }
    }
}

/// The connection from this node to one peer.
pub struct NetworkClient {
    target: NodeId,
    node: MemberAddr,
    client: Result<ClusterRaftClient<Channel>, String>,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, MemberAddr, RaftError<NodeId, E>>>;

// openraft's RaftNetwork fixes these error types; they are large by design.
#[allow(clippy::result_large_err)]
impl NetworkClient {
    fn client<E: std::error::Error>(&self) -> RpcResult<ClusterRaftClient<Channel>, E> {
        self.client.clone().map_err(|e| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("node {} address {}: {e}", self.target, self.node.raft_addr),
            )))
        })
    }

    /// Turn a reply (`Result<T, RaftError<E>>` as JSON) or a transport error
    /// into openraft's RPC result.
    fn finish<T, E>(&self, reply: Result<Response<RaftMessage>, Status>) -> RpcResult<T, E>
    where
        T: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<T, RaftError<NodeId, E>> =
            decode(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

fn with_timeout<T>(message: T, option: &RPCOption) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(option.hard_ttl());
    request
}

impl RaftNetwork<TypeConfig> for NetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let mut client = self.client()?;
        let message = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = client.append_entries(with_timeout(message, &option)).await;
        self.finish(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let mut client = self.client()?;
        let chunk = (|| -> Result<SnapshotChunk, serde_json::Error> {
            Ok(SnapshotChunk {
                vote_json: serde_json::to_vec(&rpc.vote)?,
                meta_json: serde_json::to_vec(&rpc.meta)?,
                offset: rpc.offset,
                data: rpc.data,
                done: rpc.done,
            })
        })()
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = client.install_snapshot(with_timeout(chunk, &option)).await;
        self.finish(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let mut client = self.client()?;
        let message = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = client.vote(with_timeout(message, &option)).await;
        self.finish(reply)
    }
}

/// The server side of the cluster RPCs: hands openraft's requests to the
/// local [`Raft`], proposals and membership changes to the local node.
pub struct RaftService {
    local: Arc<Local>,
}

impl RaftService {
    /// Serve the local node.
    pub(crate) fn new(local: Arc<Local>) -> Self {
        Self { local }
    }

    fn raft(&self) -> &Raft {
        &self.local.raft
    }
}

fn bad_request(e: serde_json::Error) -> Status {
    Status::invalid_argument(format!("undecodable cluster message: {e}"))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    encode(value)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("unencodable reply: {e}")))
}

#[tonic::async_trait]
impl ClusterRaft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(request.get_ref()).map_err(bad_request)?;
        reply(&self.raft().append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode(request.get_ref()).map_err(bad_request)?;
        reply(&self.raft().vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<SnapshotChunk>,
    ) -> Result<Response<RaftMessage>, Status> {
        let chunk = request.into_inner();
        let rpc = InstallSnapshotRequest::<TypeConfig> {
            vote: serde_json::from_slice(&chunk.vote_json).map_err(bad_request)?,
            meta: serde_json::from_slice(&chunk.meta_json).map_err(bad_request)?,
            offset: chunk.offset,
            data: chunk.data,
            done: chunk.done,
        };
        reply(&self.raft().install_snapshot(rpc).await)
    }

    async fn propose(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let command = decode(request.get_ref()).map_err(bad_request)?;
        let result: Result<_, ProposeError> = self.local.propose(command).await;
        reply(&result)
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        let s = self.local.status();
        let members = s
            .members
            .iter()
            .map(|(id, addr)| Member {
                id: *id,
                raft_addr: addr.raft_addr.clone(),
                data_addr: addr.data_addr.clone(),
                voter: s.voters.contains(id),
            })
            .collect();
        let followers = s
            .followers
            .iter()
            .map(|f| super::pb::FollowerProgress {
                id: f.id,
                matched_index: f.matched_index,
                lag: f.lag,
            })
            .collect();
        let metadata = self.local.state_machine.metadata();
        let streams = metadata
            .streams
            .values()
            .map(|stream| ClusterStream {
                stream_id: stream.stream_id,
                durability: stream.durability.clone(),
                replication_factor: stream.replication_factor,
                replicas: stream.replicas.clone(),
                leader: stream.leader,
            })
            .collect();
        Ok(Response::new(StatusReply {
            id: s.id,
            state: s.state,
            leader: s.leader,
            term: s.term,
            last_log_index: s.last_log_index,
            applied_index: s.applied_index,
            members,
            followers,
            raft_addr: self.local.addr.raft_addr.clone(),
            data_addr: self.local.addr.data_addr.clone(),
            streams,
            shards: metadata
                .shards
                .iter()
                .map(|(shard, a)| super::pb::ClusterShard {
                    shard: *shard,
                    replicas: a.replicas.clone(),
                    leader: a.leader,
                    epoch: a.epoch,
                })
                .collect(),
            config: metadata.config.into_iter().collect(),
        }))
    }

    async fn init(
        &self,
        request: Request<InitRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let members = request
            .into_inner()
            .members
            .into_iter()
            .map(|m| {
                let addr = MemberAddr {
                    raft_addr: m.raft_addr,
                    data_addr: m.data_addr,
                };
                (m.id, addr)
            })
            .collect();
        Ok(Response::new(node::membership_reply(
            self.local.init(members).await,
        )))
    }

    async fn join(
        &self,
        request: Request<JoinRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let r = request.into_inner();
        let addr = MemberAddr {
            raft_addr: r.raft_addr,
            data_addr: r.data_addr,
        };
        let result = match self.local.join(r.id, addr.clone()).await {
            Err(e) if !r.forwarded => match self.local.leader_elsewhere(&e) {
                Some(leader) => node::forward_join(leader, r.id, &addr).await,
                None => Err(e),
            },
            other => other,
        };
        Ok(Response::new(node::membership_reply(result)))
    }

    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let r = request.into_inner();
        let result = match self.local.leave(r.id).await {
            Err(e) if !r.forwarded => match self.local.leader_elsewhere(&e) {
                Some(leader) => node::forward_leave(leader, r.id).await,
                None => Err(e),
            },
            other => other,
        };
        Ok(Response::new(node::membership_reply(result)))
    }

    async fn shard_positions(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let query: Option<super::node::PositionsQuery> = decode(request.get_ref())
            .map_err(|e| Status::invalid_argument(format!("shard positions question: {e}")))?;
        let renew = query.is_some_and(|q| q.renew_lease);
        let positions = match self.local.positions.get() {
            Some(source) => source(renew),
            None => Vec::new(),
        };
        encode(&positions)
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }

    async fn transfer_shard(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let request: super::node::TransferRequest = decode(request.get_ref())
            .map_err(|e| Status::invalid_argument(format!("transfer request: {e}")))?;
        let result = self.local.transfer_shard(request).await;
        encode(&result)
            .map(Response::new)
            .map_err(|e| Status::internal(e.to_string()))
    }
}
