//! Questions left unanswered by a run that stopped: taken up once, with their restart notices.

use super::*;
use crate::chat::Shown;

/// The ids of the Matrix questions accepted in `[since, until)` that `store` takes over.
async fn taken(store: &Store, since: i64, until: i64) -> Vec<i64> {
    store
        .take_unanswered(Platform::Matrix, since, until)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.question.id)
        .collect()
}

/// Questions a run left unanswered are taken up by the next: once, only those of its
/// platform and window, with their notices claimed once.
#[tokio::test]
async fn unanswered_questions_are_found_and_taken_up_once() {
    for db in databases().await {
        let key = ConversationKey::new(Platform::Matrix, "", "!room:example.org", "");
        let (q1, q2, q3) = {
            // The run that stopped with questions left.
            let store = db.open().await;
            let conv = store.conversation(&key).await.unwrap();
            let other = store
                .conversation(&ConversationKey::new(Platform::Discord, "g", "c", ""))
                .await
                .unwrap();
            let new = |a: Appended| match a {
                Appended::New(id) => id,
                Appended::Duplicate(_) => panic!("new"),
            };
            let q1 = new(store
                .append_user(&conv, &user("one", Some("$1")))
                .await
                .unwrap());
            let q2 = new(store
                .append_user(&conv, &user("two", Some("$2")))
                .await
                .unwrap());
            let q3 = new(store
                .append_user(&conv, &user("three", Some("$3")))
                .await
                .unwrap());
            store
                .append_user(&other, &user("elsewhere", Some("d1")))
                .await
                .unwrap();
            store
                .append_assistant(&conv, Some(q2), "answered", Status::Complete, None)
                .await
                .unwrap();
            let until = now_ms() + 1;
            assert_eq!(
                taken(&store, 0, until).await,
                Vec::<i64>::new(),
                "a run's own questions are its own to answer"
            );
            store.close().await;
            (q1, q2, q3)
        };
        let store = db.open().await;
        let conv = store.conversation(&key).await.unwrap();
        let until = now_ms() + 1;
        assert_eq!(
            taken(&store, until, until + 1000).await,
            Vec::<i64>::new(),
            "the window bounds by acceptance time"
        );
        let found = store
            .take_unanswered(Platform::Matrix, 0, until)
            .await
            .unwrap();
        let ids: Vec<i64> = found.iter().map(|u| u.question.id).collect();
        assert_eq!(
            ids,
            vec![q1, q3],
            "answered and other platforms' questions are not pending"
        );
        assert_eq!(found[0].key, key);
        assert_eq!(found[0].private, conv.private);
        assert_eq!(found[0].question.platform_message_id.as_deref(), Some("$1"));
        assert_eq!(
            taken(&store, 0, until).await,
            Vec::<i64>::new(),
            "taken over once"
        );
        // A resumed reply is stored once; a second one for the same question is refused.
        let first = store
            .append_only_reply(conv.id, q1, "late answer", Status::Complete)
            .await
            .unwrap();
        assert!(first.is_some());
        assert_eq!(
            store
                .append_only_reply(conv.id, q1, "again", Status::Complete)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .append_only_reply(conv.id, q2, "again", Status::Complete)
                .await
                .unwrap(),
            None,
            "a question answered live is not answered again"
        );

        // A notice is claimed once, never for an answered question, and marked sent.
        assert!(!store.claim_restart_notice(q1).await.unwrap());
        assert!(store.claim_restart_notice(q3).await.unwrap());
        assert!(!store.claim_restart_notice(q3).await.unwrap());
        assert_eq!(
            store.restart_notice(q3).await.unwrap(),
            Some(NoticeStatus::Claimed)
        );
        store.mark_restart_notice_sent(q3).await.unwrap();
        assert_eq!(
            store.restart_notice(q3).await.unwrap(),
            Some(NoticeStatus::Sent)
        );
        assert_eq!(taken(&store, 0, until).await, Vec::<i64>::new());
        // The notice is not a message: the prompt's history and export do not see it.
        assert_eq!(store.since_reset(&conv).await.unwrap().len(), 5);
        let exchanges = store.exchanges(&conv).await.unwrap();
        assert_eq!(exchanges[2].answer, None);

        // Deleting the question on the platform takes its notice with it.
        store
            .delete_by_platform_id(Platform::Matrix, "$3")
            .await
            .unwrap();
        assert_eq!(store.restart_notice(q3).await.unwrap(), None);
    }
}

/// Where an answer is shown is kept until it was shown whole: a stored reply the run did not
/// get to show is taken up by the next run once, with its messages, and a question left half
/// answered comes back with the messages that show its start.
#[tokio::test]
async fn replies_not_shown_whole_are_taken_up_once_with_their_messages() {
    for db in databases().await {
        let key = ConversationKey::new(Platform::Matrix, "", "!shown:example.org", "");
        let in_two = Shown {
            notices: 1,
            ids: vec!["$note".into(), "$part".into()],
        };
        let (shown_whole, stored_unshown, half_answered, nothing_posted) = {
            let store = db.open().await;
            let conv = store.conversation(&key).await.unwrap();
            let mut ids = Vec::new();
            for (text, id) in [
                ("one", "$q1"),
                ("two", "$q2"),
                ("three", "$q3"),
                ("four", "$q4"),
            ] {
                match store
                    .append_user(&conv, &user(text, Some(id)))
                    .await
                    .unwrap()
                {
                    Appended::New(id) => ids.push(id),
                    Appended::Duplicate(_) => panic!("new"),
                }
            }
            let [whole, unshown, half, none] = ids[..] else {
                unreachable!()
            };
            assert_eq!(
                store.shown(whole).await.unwrap(),
                None,
                "nothing recorded yet"
            );
            store.set_shown(none, &Shown::default()).await.unwrap();
            assert_eq!(store.shown(none).await.unwrap(), Some(Shown::default()));
            for q in [whole, unshown] {
                store.set_shown(q, &in_two).await.unwrap();
                store
                    .append_assistant(&conv, Some(q), "the answer", Status::Cancelled, None)
                    .await
                    .unwrap();
            }
            store.mark_shown(whole).await.unwrap();
            assert_eq!(store.shown(whole).await.unwrap(), None);
            store.set_shown(half, &in_two).await.unwrap();
            store.close().await;
            (whole, unshown, half, none)
        };
        let store = db.open().await;
        let until = now_ms() + 1;
        let unshown = store
            .take_unshown(Platform::Matrix, 0, until)
            .await
            .unwrap();
        assert_eq!(unshown.len(), 1, "{unshown:?}");
        let u = &unshown[0];
        assert_eq!(u.pending.question.id, stored_unshown);
        assert_eq!(u.pending.shown.as_ref(), Some(&in_two));
        assert_eq!(
            (u.reply.as_str(), u.status),
            ("the answer", Status::Cancelled)
        );
        assert!(u.pending.question.id != shown_whole);
        let unanswered = store
            .take_unanswered(Platform::Matrix, 0, until)
            .await
            .unwrap();
        let found: Vec<(i64, Option<Shown>)> = unanswered
            .iter()
            .map(|u| (u.question.id, u.shown.clone()))
            .collect();
        assert_eq!(
            found,
            vec![
                (half_answered, Some(in_two.clone())),
                (nothing_posted, Some(Shown::default()))
            ]
        );
        // Taken over once: this run's second look finds its own, and once it is shown whole
        // no later run finds it.
        assert!(
            store
                .take_unshown(Platform::Matrix, 0, until)
                .await
                .unwrap()
                .is_empty()
        );
        store.mark_shown(stored_unshown).await.unwrap();
        store.close().await;
        let later = db.open().await;
        assert!(
            later
                .take_unshown(Platform::Matrix, 0, until)
                .await
                .unwrap()
                .is_empty()
        );
        later.close().await;
    }
}
