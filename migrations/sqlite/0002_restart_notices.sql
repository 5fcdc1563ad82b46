-- A question left unanswered across a restart and too old to answer then gets one notice that
-- the bot restarted. The row is written before the notice is sent ('claimed') and marked 'sent'
-- after, so no notice is ever sent twice, even when the process dies in between. Notices are not
-- messages: prompts and export never see them.
CREATE TABLE restart_notices (
    question_id INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    status      TEXT    NOT NULL CHECK (status IN ('claimed', 'sent')),
    created_at  INTEGER NOT NULL
);
