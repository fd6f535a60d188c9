//! `mesh-agent consumer ...`: the operator's side of the portal's accounts. Invites are
//! printed once and stored as digests; accounts are approved, suspended or removed. API keys
//! and quotas stay plain `Consumer` policies (`policy apply`, `policy history`, `rollback`).

use std::time::Duration;

use super::store::{now, AccountState, Invite, Store, StoreError};
use crate::cli::ConsumerCommand;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no account `{0}`")]
    NoAccount(String),
    #[error("{0} changed meanwhile; run the command again")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

/// Run one `mesh-agent consumer` command; what it prints.
pub async fn execute(command: ConsumerCommand) -> Result<String, AdminError> {
    match command {
        ConsumerCommand::Invite {
            consumer,
            ttl,
            note,
            etcd,
        } => {
            let store = Store::new(etcd.config().into());
            invite(&store, consumer, ttl, note).await
        }
        ConsumerCommand::Approve { email, etcd } => {
            set_state(
                &Store::new(etcd.config().into()),
                &email,
                AccountState::Active,
            )
            .await
        }
        ConsumerCommand::Suspend { email, etcd } => {
            set_state(
                &Store::new(etcd.config().into()),
                &email,
                AccountState::Suspended,
            )
            .await
        }
        ConsumerCommand::Remove { email, etcd } => {
            let store = Store::new(etcd.config().into());
            match store.delete_account(&email.to_ascii_lowercase()).await? {
                true => Ok(format!(
                    "account {email} removed (its Consumer policy stays)\n"
                )),
                false => Err(AdminError::NoAccount(email)),
            }
        }
        ConsumerCommand::Accounts { etcd } => {
            let store = Store::new(etcd.config().into());
            let mut out = format!("{:<32} {:<10} {}\n", "EMAIL", "STATE", "CONSUMER");
            for a in store.accounts().await? {
                let state = format!("{:?}", a.state).to_ascii_lowercase();
                out.push_str(&format!("{:<32} {:<10} {}\n", a.email, state, a.consumer));
            }
            Ok(out)
        }
    }
}

async fn invite(
    store: &Store,
    consumer: Option<String>,
    ttl: Duration,
    note: String,
) -> Result<String, AdminError> {
    if let Some(c) = &consumer {
        trellis_policies::validate_service_name(c)
            .map_err(|m| AdminError::Invalid(format!("--consumer: {m}")))?;
    }
    let (key, _) = crate::apikey::generate().map_err(|e| AdminError::Invalid(e.to_string()))?;
    // Recognisable as an invite, not an API key.
    let token = key.replacen("trk_", "inv_", 1);
    let digest = crate::apikey::digest_hex(&token);
    let invite = Invite {
        consumer,
        expires: now() + ttl.as_secs(),
        note,
    };
    store.put_invite(&digest, &invite).await?;
    Ok(format!(
        "invite (give it to one person; it is stored only as a digest, and works once until it expires in {}): {token}\n",
        humantime::format_duration(ttl)
    ))
}

async fn set_state(store: &Store, email: &str, state: AccountState) -> Result<String, AdminError> {
    let email = email.to_ascii_lowercase();
    let (mut account, rev) = store
        .account(&email)
        .await?
        .ok_or_else(|| AdminError::NoAccount(email.clone()))?;
    account.state = state;
    if state == AccountState::Suspended {
        // Its sessions end now, and stay ended if it is approved again.
        account.generation += 1;
    }
    if !store.update_account(&account, rev).await? {
        return Err(AdminError::Conflict(format!("account {email}")));
    }
    Ok(format!(
        "account {email} is {}\n",
        format!("{state:?}").to_ascii_lowercase()
    ))
}
