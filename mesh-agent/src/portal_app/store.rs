//! What the portal keeps in etcd, so that any ingress replica can serve any consumer: accounts,
//! invites and the secret that signs sessions. The consumers' API keys are not here: they are
//! the `Consumer` policies' (`consumer.rs`), which every ingress already receives in its
//! snapshots.
//!
//! | key | value |
//! | --- | --- |
//! | `<prefix>/v1/portal/accounts/<email>` | [`Account`] (password as an Argon2id PHC string) |
//! | `<prefix>/v1/portal/invites/<sha256 of the token>` | [`Invite`] (never the token) |
//! | `<prefix>/v1/portal/secret` | 32 random bytes, base64: signs sessions and CSRF tokens |

use base64::Engine;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::etcd::{Connector, Etcd, EtcdError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("an account with this email exists")]
    Exists,
    #[error("the invite is unknown, used or expired")]
    BadInvite,
    #[error("the system's random number generator failed")]
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountState {
    Active,
    /// Signed up without an invite: waits for `mesh-agent consumer approve`.
    Pending,
    /// Refused sign-in by an operator (`mesh-agent consumer suspend`).
    Suspended,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub email: String,
    /// Argon2id, PHC string format (salt and parameters inside).
    pub password: String,
    /// The `Consumer` policy whose keys this account manages.
    pub consumer: String,
    pub state: AccountState,
    /// Unix seconds.
    pub created: u64,
    /// The generation of its sessions: a session of another generation is refused, so signing
    /// out (which moves it on) ends every session of the account, a copied cookie's too.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    /// An existing consumer the account is bound to; a new one named after the account when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Unix seconds.
    pub expires: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Clone)]
pub struct Store {
    conn: Connector,
    root: String,
}

// === impl Store ===

impl Store {
    pub fn new(conn: Connector) -> Self {
        let root = format!("{}/v1/portal/", conn.cfg().prefix.trim_end_matches('/'));
        Self { conn, root }
    }

    pub fn cfg(&self) -> &crate::config::EtcdConfig {
        self.conn.cfg()
    }

    fn account_key(&self, email: &str) -> String {
        format!("{}accounts/{email}", self.root)
    }

    fn invite_key(&self, digest: &str) -> String {
        format!("{}invites/{digest}", self.root)
    }

    async fn etcd(&self) -> Result<Etcd, StoreError> {
        Ok(self.conn.connect().await?)
    }

    /// The account and its revision (for guarded updates).
    pub async fn account(&self, email: &str) -> Result<Option<(Account, i64)>, StoreError> {
        let etcd = self.etcd().await?;
        let key = self.account_key(email);
        let resp = etcd
            .call(etcd.client.clone().get(key.as_str(), None))
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((parse(&key, kv.value())?, kv.mod_revision()))),
        }
    }

    pub async fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let etcd = self.etcd().await?;
        let prefix = format!("{}accounts/", self.root);
        let opts = GetOptions::new().with_prefix();
        let resp = etcd
            .call(etcd.client.clone().get(prefix.as_str(), Some(opts)))
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| parse(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    /// Create `account` if its email is free, using up the invite `digest` names in the same
    /// transaction (so one invite makes one account, whichever replica is asked).
    pub async fn create_account(
        &self,
        account: &Account,
        invite: Option<&str>,
    ) -> Result<(), StoreError> {
        let etcd = self.etcd().await?;
        let key = self.account_key(&account.email);
        let value = serde_json::to_vec(account).map_err(|e| corrupt(&key, e))?;
        let mut compares = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
        let mut ops = vec![TxnOp::put(key.as_str(), value, None)];
        if let Some(d) = invite {
            let ik = self.invite_key(d);
            compares.push(Compare::version(ik.as_str(), CompareOp::Greater, 0));
            ops.push(TxnOp::delete(ik.as_str(), None));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = etcd.call(etcd.client.clone().txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        match self.account(&account.email).await? {
            Some(_) => Err(StoreError::Exists),
            None => Err(StoreError::BadInvite),
        }
    }

    /// Replace `account` if it is still at `revision`; `false` when it changed meanwhile.
    pub async fn update_account(
        &self,
        account: &Account,
        revision: i64,
    ) -> Result<bool, StoreError> {
        let etcd = self.etcd().await?;
        let key = self.account_key(&account.email);
        let value = serde_json::to_vec(account).map_err(|e| corrupt(&key, e))?;
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                revision,
            )])
            .and_then(vec![TxnOp::put(key.as_str(), value, None)]);
        let resp = etcd.call(etcd.client.clone().txn(txn)).await?;
        Ok(resp.succeeded())
    }

    pub async fn delete_account(&self, email: &str) -> Result<bool, StoreError> {
        let etcd = self.etcd().await?;
        let key = self.account_key(email);
        let resp = etcd
            .call(etcd.client.clone().delete(key.as_str(), None))
            .await?;
        Ok(resp.deleted() > 0)
    }

    pub async fn put_invite(&self, digest: &str, invite: &Invite) -> Result<(), StoreError> {
        let etcd = self.etcd().await?;
        let key = self.invite_key(digest);
        let value = serde_json::to_vec(invite).map_err(|e| corrupt(&key, e))?;
        etcd.call(etcd.client.clone().put(key.as_str(), value, None))
            .await?;
        Ok(())
    }

    pub async fn invite(&self, digest: &str) -> Result<Option<Invite>, StoreError> {
        let etcd = self.etcd().await?;
        let key = self.invite_key(digest);
        let resp = etcd
            .call(etcd.client.clone().get(key.as_str(), None))
            .await?;
        resp.kvs()
            .first()
            .map(|kv| parse(&key, kv.value()))
            .transpose()
    }

    /// Write `value` at `<prefix>/v1/portal/<rel>`, attached to `lease` (etcd deletes it when
    /// the lease expires) when set.
    pub async fn put(
        &self,
        rel: &str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let etcd = self.etcd().await?;
        let key = format!("{}{rel}", self.root);
        let opts = lease.map(|id| etcd_client::PutOptions::new().with_lease(id));
        etcd.call(etcd.client.clone().put(key.as_str(), value, opts))
            .await?;
        Ok(())
    }

    /// A lease of `ttl`: what expires data nobody needs after a while.
    pub async fn lease(&self, ttl: std::time::Duration) -> Result<i64, StoreError> {
        let etcd = self.etcd().await?;
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let resp = etcd
            .call(etcd.client.clone().lease_grant(secs, None))
            .await?;
        Ok(resp.id())
    }

    /// Every key under `<prefix>/v1/portal/<rel>`, relative to it, and its value.
    pub async fn list(&self, rel: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let etcd = self.etcd().await?;
        let prefix = format!("{}{rel}", self.root);
        let opts = GetOptions::new().with_prefix();
        let resp = etcd
            .call(etcd.client.clone().get(prefix.as_str(), Some(opts)))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                (
                    k.trim_start_matches(&prefix).to_string(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    /// The session-signing secret, made by whichever replica asks first (put-if-absent, so
    /// every replica ends up with the same one).
    pub async fn secret(&self) -> Result<Vec<u8>, StoreError> {
        let etcd = self.etcd().await?;
        let key = format!("{}secret", self.root);
        let mut fresh = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| StoreError::Random)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let txn = Txn::new()
            .when(vec![Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.as_str(), b64.encode(fresh), None)]);
        etcd.call(etcd.client.clone().txn(txn)).await?;
        let resp = etcd
            .call(etcd.client.clone().get(key.as_str(), None))
            .await?;
        let kv = resp.kvs().first().ok_or_else(|| StoreError::Corrupt {
            key: key.clone(),
            reason: "missing right after it was written".into(),
        })?;
        let secret = b64.decode(kv.value()).map_err(|e| corrupt(&key, e))?;
        if secret.len() < 32 {
            return Err(corrupt(&key, "shorter than 32 bytes"));
        }
        Ok(secret)
    }
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| corrupt(key, e))
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
