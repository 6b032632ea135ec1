package logical

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// stageMin is the fewest rows of one statement that are copied into a
// staging table instead of travelling as array parameters: the COPY costs
// one round trip more, and saves encoding, sending and decoding arrays.
const stageMin = 1000

// stages are the stream's staging tables on the destination: temporary,
// one per number of columns (c0, c1, ... text, like the arrays they
// replace), emptied at commit. A destination where the agent may not make
// temporary tables gets its rows as arrays.
type stages struct {
	off  bool         // no TEMP right: always arrays
	made map[int]bool // widths whose table exists (committed or in this transaction)
	used map[int]bool // widths filled in the current transaction
	buf  bytes.Buffer
}

func newStages() *stages { return &stages{made: map[int]bool{}, used: map[int]bool{}} }

// begin starts a destination transaction: the tables are empty.
func (st *stages) begin() { clear(st.used) }

// rollback forgets tables the abandoned transaction made.
func (st *stages) rollback() { clear(st.made) }

// rows returns a FROM item naming a's rows u(c0, ...), and its parameters
// (numbered from $1): an unnest of arrays for a few rows, a staging table
// filled by COPY for many.
func (st *stages) rows(ctx context.Context, tx pgx.Tx, a *arrays) (string, []any, error) {
	n := a.len()
	if st == nil || st.off || n < stageMin {
		return a.unnest(0), a.params(), nil
	}
	w := len(a.cols)
	table := "pg_temp.mimeo_stage_" + strconv.Itoa(w)
	switch {
	case !st.made[w]:
		ok, err := st.create(ctx, tx, table, w)
		if err != nil {
			return "", nil, err
		}
		if !ok {
			return a.unnest(0), a.params(), nil
		}
		st.made[w] = true
	case st.used[w]:
		if _, err := tx.Exec(ctx, "TRUNCATE "+table); err != nil {
			return "", nil, fmt.Errorf("empty staging table: %w", err)
		}
	}
	st.used[w] = true
	data := a.text
	if data == nil {
		st.buf.Reset()
		a.writeText(&st.buf)
		data = st.buf.Bytes()
	}
	if _, err := tx.Conn().PgConn().CopyFrom(ctx, bytes.NewReader(data), "COPY "+table+" FROM STDIN"); err != nil {
		return "", nil, fmt.Errorf("stage %d rows: %w", n, err)
	}
	return table + " u", nil, nil
}

// writeText writes the rows in COPY's text format.
func (a *arrays) writeText(b *bytes.Buffer) {
	for i := range a.len() {
		for j, c := range a.cols {
			if j > 0 {
				b.WriteByte('\t')
			}
			copyText(b, c[i])
		}
		b.WriteByte('\n')
	}
}

// encodeAhead encodes the rows for a staging table now, when they are
// enough to be staged (a nil a does nothing).
func (a *arrays) encodeAhead() {
	if a == nil || a.text != nil || a.len() < stageMin {
		return
	}
	var b bytes.Buffer
	a.writeText(&b)
	a.text = b.Bytes()
}

// create makes a staging table of w text columns inside tx (under a
// savepoint, so that lacking the TEMP right only turns staging off).
func (st *stages) create(ctx context.Context, tx pgx.Tx, table string, w int) (bool, error) {
	cols := make([]string, w)
	for i := range cols {
		cols[i] = "c" + strconv.Itoa(i) + " text"
	}
	if _, err := tx.Exec(ctx, "SAVEPOINT mimeo_stage"); err != nil {
		return false, err
	}
	_, err := tx.Exec(ctx, "CREATE TEMP TABLE IF NOT EXISTS "+table+" ("+strings.Join(cols, ", ")+") ON COMMIT DELETE ROWS")
	if err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42501" {
			return false, fmt.Errorf("make staging table: %w", err)
		}
		if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT mimeo_stage"); err != nil {
			return false, err
		}
		st.off = true
		return false, nil
	}
	_, err = tx.Exec(ctx, "RELEASE SAVEPOINT mimeo_stage")
	return err == nil, err
}

// copyText writes v as a field of COPY's text format.
func copyText(b *bytes.Buffer, v *string) {
	if v == nil {
		b.WriteString(`\N`)
		return
	}
	s := *v
	for {
		i := strings.IndexAny(s, "\\\t\n\r")
		if i < 0 {
			b.WriteString(s)
			return
		}
		b.WriteString(s[:i])
		switch s[i] {
		case '\\':
			b.WriteString(`\\`)
		case '\t':
			b.WriteString(`\t`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		}
		s = s[i+1:]
	}
}
