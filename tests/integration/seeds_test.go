package integration

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite testdata/seeds from ../shared/seeds")

// seedDir is the user documentation the API must stay compatible with: the
// shared folder beside the repository.
func seedDir() string { return filepath.Join("..", "..", "..", "shared", "seeds") }

const seedTestdata = "testdata/seeds"

type seedManifest struct {
	file string // testdata file name
	data []byte
}

// extractSeedManifests finds every `... apply -f - <<EOF` here-document of a
// VirtualImage or ClusterVirtualImage in the seed documents and returns its
// text unchanged but for the indentation of the Markdown list it sits in.
func extractSeedManifests(dir string) ([]seedManifest, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.txt"))
	if err != nil {
		return nil, err
	}
	var out []seedManifest
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		seed := strings.SplitN(filepath.Base(f), "_", 2)[0]
		lines := strings.Split(string(data), "\n")
		n := 0
		for i := 0; i < len(lines); i++ {
			if !strings.Contains(lines[i], "apply -f -") || !strings.HasSuffix(strings.TrimSpace(lines[i]), "<<EOF") {
				continue
			}
			var body []string
			for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "EOF"; i++ {
				body = append(body, lines[i])
			}
			doc := dedent(body)
			var meta struct {
				Kind     string
				Metadata struct{ Name string }
			}
			if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
				return nil, fmt.Errorf("%s: manifest %d: %w", f, n+1, err)
			}
			if meta.Kind != "VirtualImage" && meta.Kind != "ClusterVirtualImage" {
				continue
			}
			n++
			out = append(out, seedManifest{
				file: fmt.Sprintf("%s-%02d-%s.yaml", seed, n, meta.Metadata.Name),
				data: []byte(doc),
			})
		}
	}
	return out, nil
}

func dedent(lines []string) string {
	indent := -1
	for _, l := range lines {
		if strings.TrimSpace(l) == "" {
			continue
		}
		if n := len(l) - len(strings.TrimLeft(l, " ")); indent < 0 || n < indent {
			indent = n
		}
	}
	var b strings.Builder
	for _, l := range lines {
		if len(l) >= indent {
			l = l[indent:]
		}
		b.WriteString(strings.TrimRight(l, " "))
		b.WriteByte('\n')
	}
	return b.String()
}

// TestSeedTestdata_MatchesUserDocs proves the manifests the API tests apply
// are the user docs' examples, unchanged.
func TestSeedTestdata_MatchesUserDocs(t *testing.T) {
	if _, err := os.Stat(seedDir()); err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("the user docs are not beside the repository (%v)", err)
		}
		t.Fatalf("CI must have ../shared/seeds beside the clone: %v", err)
	}
	want, err := extractSeedManifests(seedDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 {
		t.Fatal("no VirtualImage/ClusterVirtualImage manifests found in the seeds")
	}
	if *update {
		os.RemoveAll(seedTestdata)
		if err := os.MkdirAll(seedTestdata, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, m := range want {
			if err := os.WriteFile(filepath.Join(seedTestdata, m.file), m.data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	have, _ := filepath.Glob(filepath.Join(seedTestdata, "*.yaml"))
	if len(have) != len(want) {
		t.Errorf("testdata has %d seed manifests, the docs have %d (run: go test ./tests/integration -run TestSeedTestdata -update)", len(have), len(want))
	}
	for _, m := range want {
		got, err := os.ReadFile(filepath.Join(seedTestdata, m.file))
		if err != nil {
			t.Errorf("missing %s: %v", m.file, err)
			continue
		}
		if !bytes.Equal(got, m.data) {
			t.Errorf("%s differs from the user docs", m.file)
		}
	}
}

// placeholder matches the <...> placeholders the docs ask the reader to fill.
var placeholder = regexp.MustCompile(`<([a-z]+)>`)

// fillPlaceholders does what a reader of the docs does before applying an
// example: replace <username> by their account name. Nothing else changes.
func fillPlaceholders(doc []byte) []byte {
	return placeholder.ReplaceAll(doc, []byte("vimg-$1"))
}
