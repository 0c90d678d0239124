package dkim

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"mime"
	"net/mail"
	"strings"
)

// field is one header field as it appears in the message, continuation
// lines included.
type field struct {
	// name is the field name in lower case.
	name string
	// raw is the whole field, including the final line break (if any).
	raw []byte
}

// errHeaderTooLarge is returned by readHeader when the header exceeds the
// limit.
var errHeaderTooLarge = errors.New("dkim: message header too large")

// readHeader reads the header section of a message from br, up to and
// including the empty line that ends it (or EOF), and splits it into
// fields. It reads at most max bytes of header. The body is left in br.
func readHeader(br *bufio.Reader, max int) ([]field, error) {
	var (
		fields []field
		cur    []byte // the field being collected
		total  int
	)
	flush := func() {
		if cur != nil {
			fields = append(fields, field{name: fieldName(cur), raw: cur})
			cur = nil
		}
	}
	for {
		line, err := readLine(br, max-total)
		total += len(line)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		if len(line) == 0 {
			flush()
			return fields, nil
		}
		if isEmptyLine(line) {
			flush()
			return fields, nil
		}
		if (line[0] == ' ' || line[0] == '\t') && cur != nil {
			cur = append(cur, line...)
		} else {
			flush()
			cur = append([]byte(nil), line...)
		}
		if err != nil { // EOF inside the header: no body.
			flush()
			return fields, nil
		}
	}
}

// readLine returns the next line including its line break, or the rest of
// the input at EOF (with io.EOF). A line longer than max fails with
// errHeaderTooLarge.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(line)+len(frag) > max {
			return nil, errHeaderTooLarge
		}
		if err == bufio.ErrBufferFull {
			line = append(line, frag...)
			continue
		}
		if line == nil {
			// frag is only valid until the next read: copy it.
			line = append(make([]byte, 0, len(frag)), frag...)
		} else {
			line = append(line, frag...)
		}
		return line, err
	}
}

func isEmptyLine(line []byte) bool {
	return bytes.Equal(line, []byte("\r\n")) || bytes.Equal(line, []byte("\n"))
}

// fieldName returns the lower-cased name of a raw header field.
func fieldName(raw []byte) string {
	i := bytes.IndexByte(raw, ':')
	if i < 0 {
		return ""
	}
	return strings.ToLower(strings.TrimRight(string(raw[:i]), " \t"))
}

// fieldValue returns the unfolded value of a raw header field.
func fieldValue(raw []byte) string {
	i := bytes.IndexByte(raw, ':')
	if i < 0 {
		return ""
	}
	v := strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return -1
		}
		return r
	}, string(raw[i+1:]))
	return strings.TrimSpace(v)
}

// relaxedHeader appends the "relaxed" canonical form (RFC 6376 §3.4.2) of
// the header field raw to dst: name in lower case, line breaks removed,
// runs of spaces and tabs reduced to one space, no white space around the
// colon or at the end, and a final CRLF when crlf is set.
func relaxedHeader(dst []byte, raw []byte, crlf bool) []byte {
	i := bytes.IndexByte(raw, ':')
	if i < 0 {
		// Not a field; hash it as an empty value of an empty name so the
		// result is deterministic. Such fields are never selected by name.
		i = len(raw)
	}
	name := bytes.TrimRight(raw[:i], " \t")
	for _, c := range name {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	dst = append(dst, ':')
	var value []byte
	if i < len(raw) {
		value = raw[i+1:]
	}
	space := false
	start := len(dst)
	for _, c := range value {
		switch c {
		case '\r', '\n':
			continue
		case ' ', '\t':
			space = true
			continue
		}
		if space && len(dst) > start {
			dst = append(dst, ' ')
		}
		space = false
		dst = append(dst, c)
	}
	if crlf {
		dst = append(dst, '\r', '\n')
	}
	return dst
}

// addrParser decodes RFC 2047 display names leniently: the display name is
// of no interest here, so an unknown charset must not make the address
// unreadable.
var addrParser = mail.AddressParser{WordDecoder: &mime.WordDecoder{
	CharsetReader: func(_ string, r io.Reader) (io.Reader, error) { return r, nil },
}}

// fromDomains returns the domains of the addresses in the From fields,
// lower-cased and without duplicates, in order of appearance.
func fromDomains(fields []field) (domains []string, nFrom int) {
	seen := make(map[string]bool)
	for _, f := range fields {
		if f.name != "from" {
			continue
		}
		nFrom++
		for _, addr := range parseAddrs(fieldValue(f.raw)) {
			at := strings.LastIndexByte(addr, '@')
			if at < 0 {
				continue
			}
			d, err := NormalizeDomain(addr[at+1:])
			if err != nil || seen[d] {
				continue
			}
			seen[d] = true
			domains = append(domains, d)
		}
	}
	return domains, nFrom
}

// parseAddrs returns the addr-specs in an address list. When the list does
// not parse, it falls back to the text between the last angle brackets, or
// the whole value if it looks like a bare address.
func parseAddrs(value string) []string {
	list, err := addrParser.ParseList(value)
	if err == nil {
		out := make([]string, 0, len(list))
		for _, a := range list {
			out = append(out, a.Address)
		}
		return out
	}
	if l := strings.LastIndexByte(value, '<'); l >= 0 {
		if r := strings.IndexByte(value[l:], '>'); r > 0 {
			return []string{strings.TrimSpace(value[l+1 : l+r])}
		}
	}
	if !strings.ContainsAny(value, " \t<>,;") {
		return []string{value}
	}
	return nil
}
