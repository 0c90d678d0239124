package queue

import "testing"

func TestValidStreamName(t *testing.T) {
	for name, ok := range map[string]bool{
		"transactional": true, "bulk": true, "news-2026_v1.eu": true,
		"": false, "Bulk": false, "bulk stream": false, "bulk\r\n": false, "ünï": false,
		"a23456789012345678901234567890123456789012345678901234567890123":   true,
		"a234567890123456789012345678901234567890123456789012345678901234":  true,
		"a2345678901234567890123456789012345678901234567890123456789012345": false,
	} {
		if err := ValidStreamName(name); (err == nil) != ok {
			t.Errorf("ValidStreamName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}
