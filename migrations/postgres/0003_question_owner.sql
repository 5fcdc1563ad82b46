-- Which run of a daemon accepted a question (a random id per process start; NULL before this
-- column existed). After a restart, a daemon takes up only the unanswered questions of runs that
-- are gone, and takes each over in one statement, so a question another live daemon is still
-- answering is never answered twice.
ALTER TABLE messages ADD COLUMN accepted_by BIGINT;
