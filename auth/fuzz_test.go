package auth

import (
	"fmt"
	"testing"
)

// FuzzUsersFile checks that any users file the parser accepts is written
// back (as SetUser and RemoveUser do) into a file that parses to the same
// users: an edit can never corrupt or widen another user's entry.
func FuzzUsersFile(f *testing.F) {
	const h = "$2a$04$abcdefghijklmnopqrstuuJ5zGvmCSMKr0mpvH2sF6hvUz9pL1KWK"
	f.Add("alice:" + h + "\n")
	f.Add("# c\nbob:" + h + ":domains=a.test,b.test addrs=x@c.test max_size=10 messages=1 recipients=2 per=1m sandbox\n")
	f.Add("carol:" + h + ":sandbox=false\r\n\n  \n")
	f.Fuzz(func(t *testing.T, data string) {
		s, err := parseUsers([]byte(data))
		if err != nil {
			return
		}
		out, err := formatUsers(s)
		if err != nil {
			t.Fatal(err)
		}
		s2, err := parseUsers(out)
		if err != nil {
			t.Fatalf("written file does not parse: %v\n%s", err, out)
		}
		if fmt.Sprint(s.order) != fmt.Sprint(s2.order) {
			t.Fatalf("users %v became %v", s.order, s2.order)
		}
		for _, n := range s.order {
			if a, b := fmt.Sprintf("%+v", *s.byName[n]), fmt.Sprintf("%+v", *s2.byName[n]); a != b {
				t.Fatalf("user %q: %s became %s", n, a, b)
			}
		}
	})
}
