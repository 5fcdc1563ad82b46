//! Several daemons on one memory: a message claimed once, one answer at a time per conversation,
//! and a live daemon's questions left to it.

use super::*;

/// Two stores on one database (two daemons) given the same platform message: the insert is the
/// claim, so exactly one of them stores it as new and the other learns it is a duplicate.
#[tokio::test]
async fn two_stores_claim_one_message_once() {
    for db in databases().await {
        let first = db.open().await;
        let second = db.open().await;
        let key = ConversationKey::new(Platform::Discord, "g", "c", "");
        let conv_a = first.conversation(&key).await.unwrap();
        let conv_b = second.conversation(&key).await.unwrap();
        assert_eq!(conv_a.id, conv_b.id, "one conversation for one key");
        for round in 0..20 {
            let id = format!("m{round}");
            let turn = user("hi", Some(&id));
            let (a, b) = tokio::join!(
                first.append_user(&conv_a, &turn),
                second.append_user(&conv_b, &turn),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            match (a, b) {
                (Appended::New(x), Appended::Duplicate(y))
                | (Appended::Duplicate(y), Appended::New(x)) => assert_eq!(x, y),
                other => panic!("round {round}: exactly one claim must win: {other:?}"),
            }
        }
        assert_eq!(first.since_reset(&conv_a).await.unwrap().len(), 20);
    }
}

/// Two daemons on one PostgreSQL memory answer one conversation at a time: the second waits
/// for the first's turn to end, other conversations do not wait, and a daemon whose session dies
/// (a crash) releases its conversations at once.
#[tokio::test]
async fn turns_order_one_conversation_across_daemons() {
    use sqlx::Connection;
    let db = postgres_db().await;
    let first = db.open().await;
    let second = db.open().await;
    let conv = first
        .conversation(&ConversationKey::console("busy"))
        .await
        .unwrap();
    let other = first
        .conversation(&ConversationKey::console("free"))
        .await
        .unwrap();
    let wait = Duration::from_millis(400);

    let turn = first.take_turn(conv.id).await.unwrap();
    assert!(
        tokio::time::timeout(wait, second.take_turn(conv.id))
            .await
            .is_err(),
        "the second daemon waits while the first answers"
    );
    // The same daemon's next task waits too.
    assert!(
        tokio::time::timeout(wait, first.take_turn(conv.id))
            .await
            .is_err(),
        "one turn per conversation within a daemon as well"
    );
    let free = tokio::time::timeout(wait, second.take_turn(other.id))
        .await
        .expect("another conversation does not wait")
        .unwrap();
    drop(free);
    drop(turn);
    let taken = tokio::time::timeout(Duration::from_secs(5), second.take_turn(conv.id))
        .await
        .expect("the turn passes once the first is done")
        .unwrap();
    drop(taken);

    // A crash: the first daemon's lock session ends without releasing anything.
    let _held = tokio::time::timeout(Duration::from_secs(5), first.take_turn(conv.id))
        .await
        .expect("the first takes it back")
        .unwrap();
    let mut admin = sqlx::PgConnection::connect(&db.target).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND classid::bigint = $1 AND objid::bigint = $2
           AND objsubid = 2
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(i64::from(super::turns::LOCK_SPACE))
    .bind(conv.id)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(ended, vec![true], "one session held the conversation");
    let started = std::time::Instant::now();
    let _taken = tokio::time::timeout(Duration::from_secs(5), second.take_turn(conv.id))
        .await
        .expect("a dead daemon's conversation is free at once")
        .unwrap();
    println!("taken over after {:?}", started.elapsed());
}

/// On SQLite one daemon owns the file: a turn is granted at once.
#[tokio::test]
async fn sqlite_turns_are_granted_at_once() {
    let db = sqlite_db();
    let store = db.open().await;
    let conv = store
        .conversation(&ConversationKey::console("t"))
        .await
        .unwrap();
    let turn = tokio::time::timeout(Duration::from_secs(1), store.take_turn(conv.id))
        .await
        .expect("no wait")
        .unwrap();
    drop(turn);
}

/// Several daemons on one PostgreSQL memory: the questions of a daemon that is still running
/// are left to it, and when it is gone, of two daemons looking at once exactly one takes each.
#[tokio::test]
async fn a_live_daemons_questions_are_left_to_it_and_a_gone_ones_taken_over_once() {
    let db = postgres_db().await;
    let live = db.open().await;
    let key = ConversationKey::new(Platform::Discord, "g", "c", "");
    let conv = live.conversation(&key).await.unwrap();
    let Appended::New(q) = live
        .append_user(&conv, &user("still being answered", Some("d1")))
        .await
        .unwrap()
    else {
        panic!("new")
    };
    let (b, c) = (db.open().await, db.open().await);
    let until = now_ms() + 1;
    for other in [&b, &c] {
        assert!(
            other
                .take_unanswered(Platform::Discord, 0, until)
                .await
                .unwrap()
                .is_empty(),
            "a running daemon's question is taken over"
        );
    }
    live.close().await;
    let (x, y) = tokio::join!(
        b.take_unanswered(Platform::Discord, 0, until),
        c.take_unanswered(Platform::Discord, 0, until),
    );
    let taken: Vec<i64> = x
        .unwrap()
        .into_iter()
        .chain(y.unwrap())
        .map(|u| u.question.id)
        .collect();
    assert_eq!(taken, vec![q], "exactly one daemon takes the question over");
}
