//! `kaelix cluster init|join|leave|status|transfer`, over the cluster RPCs that a
//! cluster member's admin API serves (`proto/cluster.proto` in the
//! controlplane), and starting this broker's Raft node in `kaelix serve`.
//! Same conventions as `kaelix stream|broker|config`: `--admin` names the
//! target broker, tables for people, `--json` for scripts, one line on
//! stderr and exit status 1 on failure.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use kaelix_controlplane::cluster::pb::RaftMessage;
use kaelix_controlplane::cluster::pb::cluster_raft_client::ClusterRaftClient;
use kaelix_controlplane::cluster::pb::{
    InitRequest, JoinRequest, LeaveRequest, Member, MembershipReply, StatusReply, StatusRequest,
};
use kaelix_controlplane::cluster::{
    ClusterNode, ClusterNodeConfig, TransferReport, TransferRequest,
};
use kaelix_controlplane::config::Config;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::admin::{Conn, Failure, block_on, channel, finish, new_table, print_json};

/// `kaelix cluster`.
#[derive(Debug, Args)]
#[command(
    after_help = "Each broker needs a [cluster] section (node_id, addr; see docs/cluster.md).
Any member's admin or cluster address works as ADDR; a member that is not the
Raft leader forwards the change to it.

Examples:
  kaelix cluster init --admin 127.0.0.1:7002             first node: a one-node cluster
  kaelix cluster join 127.0.0.1:7002 --admin 127.0.0.1:7012
                                                         the broker at 7012 joins the cluster of 7002
  kaelix cluster status --admin 127.0.0.1:7012           members, leader, term, log, lag
  kaelix cluster status --json
  kaelix cluster leave --admin 127.0.0.1:7012            the broker at 7012 leaves
  kaelix cluster leave --node 3                          remove node 3 (asked of the broker at --admin)
  kaelix cluster transfer --shard 0 --to 2               node 2 leads shard 0 from now on"
)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Form a new one-node cluster of the target broker (once, on the first node).
    Init,
    /// Add the target broker to the cluster that ADDR belongs to: as a
    /// learner first, then as a voter once it has caught up (joint consensus).
    Join {
        /// Admin or cluster address of any member of the cluster.
        addr: String,
    },
    /// Remove a node from the cluster (voters first, then members). Stop its
    /// broker afterwards: it keeps its old view until it is shut down.
    Leave {
        /// The node to remove; the target broker itself when left out.
        #[arg(long)]
        node: Option<u64>,
    },
    /// Members, Raft leader, term, last log index, applied index and each
    /// member's lag (asked of the leader), streams and cluster-wide config.
    Status,
    /// Move a shard's leadership to one of its followers, as planned (with
    /// data replication on): the leader stops taking writes (producers are
    /// redirected), waits until the new leader has its whole log, then the
    /// new leader is recorded at the next epoch. Nothing acknowledged is
    /// lost and nothing in flight is refused; prints the timings.
    Transfer {
        /// The shard (`kaelix cluster status` lists them with their leaders).
        #[arg(long)]
        shard: u32,
        /// The new leader; the follower whose log goes furthest when left out.
        #[arg(long)]
        to: Option<u64>,
    },
}

/// Run `kaelix cluster ...`.
pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    finish(block_on(&args.conn, inner(args.command, &args.conn)))
}

type Client = ClusterRaftClient<Channel>;

/// The target broker's cluster service, over its admin API.
async fn target(conn: &Conn) -> Result<Client, Failure> {
    Ok(ClusterRaftClient::new(channel(conn).await?))
}

/// Another member's cluster service (`host:port`, admin or cluster address).
async fn member(addr: &str, timeout: u64) -> Result<Client, Failure> {
    let conn = Conn {
        admin: addr.to_string(),
        json: false,
        timeout,
    };
    let channel = channel(&conn)
        .await
        .map_err(|Failure(m)| Failure(m.replace("admin API", "cluster member")))?;
    Ok(ClusterRaftClient::new(channel))
}

fn rpc_failure(context: &str, addr: &str, status: tonic::Status) -> Failure {
    if status.code() == tonic::Code::Unimplemented {
        return Failure(format!(
            "{context}: the broker at {addr} is not a cluster member (start it with a [cluster] \
             section: node_id, addr; see docs/cluster.md)"
        ));
    }
    crate::admin::status_line(context, status)
}

/// A membership reply as a result; a redirect names the leader to ask.
fn membership(context: &str, reply: MembershipReply) -> Result<(), Failure> {
    if reply.error.is_empty() {
        return Ok(());
    }
    if !reply.leader_addr.is_empty() {
        return Err(Failure(format!(
            "{context}: not answered by the leader; the leader is node {} at {}: retry with that \
             address",
            reply.leader_id.map_or("?".into(), |id| id.to_string()),
            reply.leader_addr
        )));
    }
    Err(Failure(format!("{context}: {}", reply.error)))
}

async fn status_of(client: &mut Client, addr: &str) -> Result<StatusReply, Failure> {
    Ok(client
        .status(StatusRequest {})
        .await
        .map_err(|s| rpc_failure("cluster status", addr, s))?
        .into_inner())
}

async fn inner(command: ClusterCommand, conn: &Conn) -> Result<(), Failure> {
    let mut client = target(conn).await?;
    match command {
        ClusterCommand::Init => {
            let me = status_of(&mut client, &conn.admin).await?;
            if !me.members.is_empty() {
                return Err(Failure(format!(
                    "cluster init: node {} is already in a cluster of {} member(s); use `kaelix \
                     cluster status`",
                    me.id,
                    me.members.len()
                )));
            }
            let request = InitRequest {
                members: vec![Member {
                    id: me.id,
                    raft_addr: me.raft_addr.clone(),
                    data_addr: me.data_addr.clone(),
                    voter: true,
                }],
            };
            let reply = client
                .init(request)
                .await
                .map_err(|s| rpc_failure("cluster init", &conn.admin, s))?
                .into_inner();
            membership("cluster init", reply)?;
            if conn.json {
                print_json(&json!({ "initialized": me.id, "raft_addr": me.raft_addr }));
            } else {
                println!(
                    "initialized a one-node cluster: node {} at {} (add nodes with `kaelix cluster join {}`)",
                    me.id, me.raft_addr, conn.admin
                );
            }
        }
        ClusterCommand::Join { addr } => {
            let me = status_of(&mut client, &conn.admin).await?;
            if me.members.iter().any(|m| m.id == me.id && m.voter) {
                return Err(Failure(format!(
                    "cluster join: node {} is already a voter of a cluster (leader {})",
                    me.id,
                    me.leader.map_or("unknown".into(), |l| l.to_string())
                )));
            }
            let mut seed = member(&addr, conn.timeout).await?;
            let request = JoinRequest {
                id: me.id,
                raft_addr: me.raft_addr.clone(),
                data_addr: me.data_addr.clone(),
                forwarded: false,
            };
            let reply = seed
                .join(request)
                .await
                .map_err(|s| rpc_failure(&format!("cluster join {addr}"), &addr, s))?
                .into_inner();
            membership(&format!("cluster join {addr}"), reply)?;
            if conn.json {
                print_json(&json!({ "joined": me.id, "raft_addr": me.raft_addr, "via": addr }));
            } else {
                println!(
                    "node {} ({}) joined the cluster of {addr} as a voter",
                    me.id, me.raft_addr
                );
            }
        }
        ClusterCommand::Leave { node } => {
            let id = match node {
                Some(id) => id,
                None => status_of(&mut client, &conn.admin).await?.id,
            };
            let reply = client
                .leave(LeaveRequest {
                    id,
                    forwarded: false,
                })
                .await
                .map_err(|s| rpc_failure("cluster leave", &conn.admin, s))?
                .into_inner();
            membership(&format!("cluster leave (node {id})"), reply)?;
            if conn.json {
                print_json(&json!({ "removed": id }));
            } else {
                println!(
                    "node {id} removed from the cluster; stop its broker (it keeps its old view until shut down)"
                );
            }
        }
        ClusterCommand::Transfer { shard, to } => {
            let request = TransferRequest {
                shard,
                to,
                forwarded: false,
            };
            let message = RaftMessage {
                json: serde_json::to_vec(&request)
                    .map_err(|e| Failure(format!("cluster transfer: {e}")))?,
            };
            let reply = client
                .transfer_shard(message)
                .await
                .map_err(|s| rpc_failure("cluster transfer", &conn.admin, s))?
                .into_inner();
            let result: Result<TransferReport, String> = serde_json::from_slice(&reply.json)
                .map_err(|e| Failure(format!("cluster transfer: undecodable reply: {e}")))?;
            let report = result.map_err(|e| Failure(format!("cluster transfer: {e}")))?;
            if conn.json {
                print_json(&serde_json::to_value(&report).unwrap_or(Value::Null));
            } else {
                let leading = report
                    .leading_ms
                    .map_or("not confirmed within 2 s".to_string(), |ms| {
                        format!("{ms:.1} ms")
                    });
                println!(
                    "shard {}: node {} leads it now (was node {}, epoch {}): it had the whole log \
                     (position {}) after {:.1} ms, was recorded after {:.1} ms, took writes after {leading}",
                    report.shard,
                    report.to,
                    report.from,
                    report.epoch,
                    report.position,
                    report.caught_up_ms,
                    report.recorded_ms
                );
            }
        }
        ClusterCommand::Status => {
            let me = status_of(&mut client, &conn.admin).await?;
            let leader_view = leader_status(&me, conn.timeout).await;
            if conn.json {
                print_json(&status_json(&me, leader_view.as_ref()));
            } else {
                print_status(&me, leader_view.as_ref());
            }
        }
    }
    Ok(())
}

/// The leader's own status (it alone knows each member's progress): this
/// node's when it leads, else asked of the leader, best effort.
async fn leader_status(me: &StatusReply, timeout: u64) -> Option<StatusReply> {
    let leader = me.leader?;
    if leader == me.id {
        return Some(me.clone());
    }
    let addr = &me.members.iter().find(|m| m.id == leader)?.raft_addr;
    let mut client = member(addr, timeout).await.ok()?;
    let reply = tokio::time::timeout(
        Duration::from_secs(timeout.clamp(1, 3)),
        client.status(StatusRequest {}),
    )
    .await
    .ok()?
    .ok()?
    .into_inner();
    (reply.state == "Leader").then_some(reply)
}

/// (matched index, lag) of member `id` as the leader reports it.
fn progress(leader: Option<&StatusReply>, id: u64) -> (Option<u64>, Option<u64>) {
    let Some(leader) = leader else {
        return (None, None);
    };
    if id == leader.id {
        return (leader.last_log_index, Some(0));
    }
    leader
        .followers
        .iter()
        .find(|f| f.id == id)
        .map_or((None, None), |f| (f.matched_index, Some(f.lag)))
}

fn role(me: &StatusReply, m: &Member) -> &'static str {
    match (me.leader == Some(m.id), m.voter) {
        (true, _) => "leader",
        (false, true) => "follower",
        (false, false) => "learner",
    }
}

fn status_json(me: &StatusReply, leader: Option<&StatusReply>) -> Value {
    let members: Vec<Value> = me
        .members
        .iter()
        .map(|m| {
            let (matched, lag) = progress(leader, m.id);
            json!({
                "id": m.id, "raft_addr": m.raft_addr, "data_addr": m.data_addr,
                "voter": m.voter, "role": role(me, m), "matched_index": matched, "lag": lag,
            })
        })
        .collect();
    let streams: Vec<Value> = me
        .streams
        .iter()
        .map(|s| {
            json!({
                "stream_id": s.stream_id, "durability": s.durability,
                "replication_factor": s.replication_factor, "replicas": s.replicas,
                "leader": s.leader,
            })
        })
        .collect();
    let shards: Vec<Value> = me
        .shards
        .iter()
        .map(|s| {
            json!({
                "shard": s.shard, "replicas": s.replicas, "leader": s.leader, "epoch": s.epoch,
            })
        })
        .collect();
    json!({
        "node": me.id,
        "state": me.state,
        "raft_addr": me.raft_addr,
        "leader": me.leader,
        "term": me.term,
        "last_log_index": me.last_log_index,
        "applied_index": me.applied_index,
        "voters": me.members.iter().filter(|m| m.voter).count(),
        "members": members,
        "lag_from_leader": leader.is_some(),
        "streams": streams,
        "shards": shards,
        "config": me.config,
    })
}

fn opt(value: Option<u64>) -> String {
    value.map_or("-".into(), |v| v.to_string())
}

fn print_status(me: &StatusReply, leader: Option<&StatusReply>) {
    println!(
        "node {} ({})  leader {}  term {}  last log {}  applied {}",
        me.id,
        me.state.to_ascii_lowercase(),
        opt(me.leader),
        me.term,
        opt(me.last_log_index),
        opt(me.applied_index)
    );
    if me.members.is_empty() {
        println!(
            "not in a cluster yet: `kaelix cluster init` (first node) or `kaelix cluster join ADDR`"
        );
        return;
    }
    let mut table = new_table(&["node", "role", "raft addr", "data addr", "matched", "lag"]);
    for m in &me.members {
        let (matched, lag) = progress(leader, m.id);
        table.add_row(vec![
            m.id.to_string(),
            role(me, m).to_string(),
            m.raft_addr.clone(),
            m.data_addr.clone(),
            opt(matched),
            opt(lag),
        ]);
    }
    println!("{table}");
    if leader.is_none() {
        println!("(lag unknown: the leader did not answer)");
    }
    if !me.streams.is_empty() {
        let mut table = new_table(&["stream", "durability", "replicas", "leader"]);
        for s in &me.streams {
            let replicas: Vec<String> = s.replicas.iter().map(u64::to_string).collect();
            table.add_row(vec![
                s.stream_id.to_string(),
                s.durability.clone(),
                replicas.join(","),
                opt(s.leader),
            ]);
        }
        println!("{table}");
    }
    if !me.shards.is_empty() {
        let mut table = new_table(&["shard", "replicas", "leader", "epoch"]);
        for s in &me.shards {
            let replicas: Vec<String> = s.replicas.iter().map(u64::to_string).collect();
            table.add_row(vec![
                s.shard.to_string(),
                replicas.join(","),
                s.leader.to_string(),
                s.epoch.to_string(),
            ]);
        }
        println!("{table}");
    }
    for (key, value) in &me.config {
        println!("cluster config: {key} = {value}");
    }
}

/// Start this broker's member of the metadata Raft group when the
/// configuration has a `[cluster]` section (`kaelix serve`).
pub async fn start_node(
    config: &Config,
    data_addr: String,
) -> anyhow::Result<Option<Arc<ClusterNode>>> {
    let Some(section) = &config.cluster else {
        return Ok(None);
    };
    let dir = section
        .raft_dir(config.broker.data_dir.as_deref())
        .context("cluster.data_dir is unset and so is broker.data_dir")?;
    let node_config = ClusterNodeConfig {
        raft_bind: section.addr,
        advertise_addr: section.advertise_addr.clone(),
        data_addr,
        heartbeat_ms: section.heartbeat_ms,
        election_timeout_min_ms: section.election_timeout_min_ms,
        election_timeout_max_ms: section.election_timeout_max_ms,
        ..ClusterNodeConfig::new(section.node_id, &dir)
    };
    let node = ClusterNode::start(node_config)
        .await
        .with_context(|| format!("starting cluster node {}", section.node_id))?;
    let status = node.status();
    println!(
        "kaelix cluster ready: node {} raft {} log {} ({})",
        node.id(),
        node.addr().raft_addr,
        display(&dir),
        if status.members.is_empty() {
            "not in a cluster yet".to_string()
        } else {
            format!("{} member(s)", status.members.len())
        }
    );
    Ok(Some(Arc::new(node)))
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
