-- Where a question's answer is shown while it is written: the platform messages posted for it
-- (`chat::Shown`'s text: the count of notes before the answer, then one platform id per line).
-- Written as messages are posted for the answer, and as '' just before a reply is stored with
-- nothing posted yet; NULL before that and again once the final text was shown. A restart finds
-- stored replies not yet shown whole, and questions left half answered, and finishes them in the
-- same messages instead of posting again.
ALTER TABLE messages ADD COLUMN shown_in TEXT;
