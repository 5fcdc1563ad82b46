//! Room membership: invites (joined, with retries, when the inviter is allowed; declined
//! otherwise), leaving a room once nobody allowed is left in it, and whether a room is a DM,
//! remembered per room until its membership changes.

use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::ruma::events::room::member::{
    MembershipState, OriginalSyncRoomMemberEvent, StrippedRoomMemberEvent,
};
use matrix_sdk::{Room, RoomMemberships, RoomState};

use super::shared::Shared;

impl Shared {
    /// A room marked direct, or one with nobody but the bot and one other (joined or invited).
    /// Remembered per room until a membership changes, so busy rooms don't list their members
    /// for every message.
    pub(super) async fn is_direct(&self, room: &Room) -> bool {
        let known = self
            .direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(room.room_id())
            .copied();
        if let Some(direct) = known {
            return direct;
        }
        let direct = room.is_direct().await.unwrap_or(false)
            || match room.members(RoomMemberships::ACTIVE).await {
                Ok(members) => members.len() <= 2,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list members");
                    return false;
                }
            };
        self.direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room.room_id().to_owned(), direct);
        direct
    }

    pub(super) async fn on_invite(self: Arc<Self>, ev: StrippedRoomMemberEvent, room: Room) {
        if ev.state_key != self.user_id || room.state() != RoomState::Invited {
            return;
        }
        let room_id = room.room_id().to_owned();
        if !self.access().admits(ev.sender.as_str(), room_id.as_str()) {
            tracing::info!(room = %room_id, inviter = %ev.sender, "declining an invite from someone not allowed");
            if let Err(e) = room.leave().await {
                tracing::warn!(error = %e, "cannot decline the invite");
            }
            return;
        }
        tokio::spawn(async move {
            // Synapse can refuse a join that races the invite; try again for about a minute.
            let mut wait = Duration::from_millis(500);
            for attempt in 1..=8 {
                match room.join().await {
                    Ok(()) => {
                        tracing::info!(room = %room_id, inviter = %ev.sender, "joined");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(room = %room_id, attempt, error = %e, "cannot join yet");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(16));
                    }
                }
            }
            tracing::error!(room = %room_id, "giving up joining");
        });
    }

    /// Leaves a room once nobody it is there for remains.
    pub(super) async fn on_member(self: Arc<Self>, ev: OriginalSyncRoomMemberEvent, room: Room) {
        self.direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(room.room_id());
        if room.state() != RoomState::Joined
            || ev.state_key == self.user_id
            || !matches!(
                ev.content.membership,
                MembershipState::Leave | MembershipState::Ban
            )
        {
            return;
        }
        let members = match room.members(RoomMemberships::JOIN).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list members");
                return;
            }
        };
        let access = self.access();
        let anyone = members
            .iter()
            .any(|m| m.user_id() != self.user_id && access.admits_user(m.user_id().as_str()));
        if !anyone {
            tracing::info!(room = %room.room_id(), "leaving a room with nobody allowed left");
            if let Err(e) = room.leave().await {
                tracing::warn!(error = %e, "cannot leave the room");
            }
        }
    }
}
