-- Every writer of membership_history says the expiry of an add itself (the worker's change set knows it, and so
-- do the set-based statements): the row trigger of 005 that looked each row's membership up cost two thirds of a
-- history insert (29 -> 11 µs a row here), and it recorded the membership's final expiry, so the first of two adds
-- of one batch got the second's.
DROP TRIGGER membership_history_expiry ON membership_history;
DROP FUNCTION record_membership_expiry();
