-- mimeo 0.6.0 -> 0.7.0: a CALL ..._wait returns soon after its request ends.
--
-- commit_and_wait's pause between two looks at the request grew by half
-- each time, to 50 ms after 0.11 s of waiting: a CALL that waited longer
-- returned up to 50 ms after its request had ended. The pause now follows
-- the time waited: a hundredth of it, from 2 ms to 50 ms. A CALL that
-- waited a second returns within about 10 ms of its request's end; a long
-- wait still looks 20 times a second.

\echo Use "ALTER EXTENSION mimeo UPDATE" or "mimeo-agent install" to load this file. \quit

-- Runs of agents hold this lock shared: an upgrade waits for them.
SELECT pg_catalog.pg_advisory_xact_lock(1835625831);

CREATE OR REPLACE FUNCTION mimeo.installed_version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT '0.7.0'::text $$;

CREATE OR REPLACE PROCEDURE mimeo.commit_and_wait(p_request_id bigint, p_timeout interval DEFAULT '1 hour')
LANGUAGE plpgsql AS $$
DECLARE
    r mimeo.request;
    v_timeout interval := coalesce(p_timeout, '1 hour');
    v_deadline timestamptz;
    v_start timestamptz;
    v_step int := 0;
BEGIN
    COMMIT;
    v_start := clock_timestamp();
    v_deadline := v_start + v_timeout;
    LOOP
        r := mimeo.wait_poll(p_request_id, v_deadline, v_timeout);
        IF v_step >= 0 THEN
            v_step := mimeo.notice_steps(p_request_id, v_step);
        END IF;
        EXIT WHEN r.id IS NOT NULL;
        COMMIT;
        -- A hundredth of the time waited so far, from 2 ms to 50 ms.
        PERFORM pg_sleep(least(greatest(extract(epoch FROM clock_timestamp() - v_start) / 100, 0.002), 0.05,
                               greatest(extract(epoch FROM v_deadline - clock_timestamp()), 0.001)));
    END LOOP;
    RAISE NOTICE 'mimeo: request % % %: %', r.id, r.action, r.status, coalesce(r.message, '');
END
$$;

