package relay

import "bytes"

// dotStuffer dot-stuffs a message body for DATA (RFC 5321 §4.5.2) a block
// at a time. Its output is byte for byte what net/textproto's DotWriter,
// which go-smtp's client uses, writes for the same input: a leading dot on
// a line is doubled, a bare LF becomes CRLF, and a bare CR is passed on
// (the queue holds CRLF-clean bodies, so neither occurs in practice, but
// the equivalence holds for any input). DotWriter handles one byte per
// call through bufio.Writer.WriteByte; dotStuffer copies the runs between
// line ends with append, finding them with bytes.IndexByte.
type dotStuffer struct {
	state int
}

// The states of net/textproto's dotWriter.
const (
	dsBegin     = iota // nothing written yet
	dsBeginLine        // at the start of a line
	dsCR               // wrote a CR, possibly at the end of a line
	dsData             // in the middle of a line
)

// stuff appends the dot-stuffed form of b to dst.
func (s *dotStuffer) stuff(dst, b []byte) []byte {
	// crAt and lfAt are the positions of the next CR and LF at or after
	// i (len(b) when there is none), found again only once i passed them,
	// so that a block without one of them is not scanned once per line.
	crAt, lfAt := -1, -1
	next := func(c byte, from int) int {
		if j := bytes.IndexByte(b[from:], c); j >= 0 {
			return from + j
		}
		return len(b)
	}
	for i := 0; i < len(b); {
		switch s.state {
		case dsCR:
			// DotWriter writes whatever follows a CR as it is.
			c := b[i]
			dst = append(dst, c)
			i++
			s.state = dsData
			if c == '\n' {
				s.state = dsBeginLine
			}
			continue
		case dsBegin, dsBeginLine:
			if b[i] == '.' {
				dst = append(dst, '.')
			}
			s.state = dsData
		}
		if crAt < i {
			crAt = next('\r', i)
		}
		if lfAt < i {
			lfAt = next('\n', i)
		}
		j := min(crAt, lfAt)
		dst = append(dst, b[i:j]...)
		i = j
		if j == len(b) {
			break
		}
		if b[j] == '\r' {
			dst = append(dst, '\r')
			s.state = dsCR
		} else {
			dst = append(dst, '\r', '\n')
			s.state = dsBeginLine
		}
		i++
	}
	return dst
}

// closeTrim is how many bytes at the end of the stuffed body to leave out
// when the end-of-data sequence will be written by a DotWriter that saw
// nothing (it writes "\r\n.\r\n"): the CRLF or CR that already ends the
// body, so that the result is what one DotWriter fed the whole body
// writes.
func (s *dotStuffer) closeTrim() int {
	switch s.state {
	case dsBeginLine:
		return 2 // the body ends with "\r\n"
	case dsCR:
		return 1 // the body ends with "\r"
	}
	return 0
}
