//! The cluster RPCs' generated messages, clients and servers
//! (`proto/cluster.proto`, package `kaelix.cluster.v1`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kaelix.cluster.v1");
