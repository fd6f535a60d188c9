//! Who is in the mesh, read from etcd: every instance's registration (address, identity,
//! zone), the TTL left on its lease, and the revision its sidecar last applied. The dashboard
//! needs nothing else from anyone: no control plane, no agent on the hosts.

use std::collections::HashMap;

use etcd_client::GetOptions;
use futures_util::StreamExt;
use serde::Serialize;
use trellis_policies::Registration;

use crate::etcd::keys::Keys;
use crate::etcd::registration::applied_revisions;
use crate::etcd::{Etcd, EtcdError};

/// Lease lookups in flight at once (one call per instance).
const LEASE_LOOKUPS: usize = 32;

/// One registered instance, as etcd has it.
#[derive(Clone, Debug, Serialize)]
pub struct Member {
    pub service: String,
    pub instance: String,
    pub address: String,
    pub identity: String,
    pub zone: Option<String>,
    pub version: String,
    pub draining: bool,
    /// Seconds left on its lease (`None`: unknown).
    pub lease_ttl_left: Option<i64>,
    /// The mesh revision its sidecar last applied.
    pub applied_revision: Option<i64>,
}

/// The whole fleet, and the revision the policies last changed at.
pub struct Fleet {
    pub members: Vec<Member>,
    pub revision: i64,
}

/// Read the fleet: registrations and statuses in two range reads, then the lease TTLs.
/// Registrations that do not parse are skipped and counted in the log, never fatal.
pub async fn read(etcd: &Etcd, keys: &Keys) -> Result<Fleet, EtcdError> {
    let mut client = etcd.client.clone();
    let regs = etcd
        .call(client.get(keys.services(), Some(GetOptions::new().with_prefix())))
        .await?;
    let revision = regs.header().map_or(0, |h| h.revision());
    let applied = applied_revisions(etcd, keys).await?;
    let mut found = Vec::new();
    let mut garbage = 0;
    for kv in regs.kvs() {
        match serde_json::from_slice::<Registration>(kv.value()) {
            Ok(r) => found.push((r, kv.lease())),
            Err(_) => garbage += 1,
        }
    }
    if garbage > 0 {
        tracing::warn!(
            count = garbage,
            "registrations in etcd that do not parse were skipped"
        );
    }
    let leases: Vec<i64> = found.iter().map(|(_, l)| *l).filter(|l| *l != 0).collect();
    let ttls: HashMap<i64, i64> = futures_util::stream::iter(leases)
        .map(|id| {
            let mut client = client.clone();
            async move {
                let ttl = etcd.call(client.lease_time_to_live(id, None)).await;
                (id, ttl.map(|t| t.ttl()).unwrap_or(-1))
            }
        })
        .buffer_unordered(LEASE_LOOKUPS)
        .collect()
        .await;
    let members = found
        .into_iter()
        .map(|(r, lease)| Member {
            lease_ttl_left: ttls.get(&lease).copied().filter(|t| *t >= 0),
            applied_revision: applied
                .get(&(r.service.clone(), r.instance.clone()))
                .copied(),
            service: r.service,
            instance: r.instance,
            address: r.address,
            identity: r.identity,
            zone: r.zone,
            version: r.version,
            draining: r.draining,
        })
        .collect();
    Ok(Fleet { members, revision })
}
