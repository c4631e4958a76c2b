package upload

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"vimg.dev/vimg/pkg/worker/api"
)

func TestSecretStore_UpdateRunsAgainOnAConcurrentWrite(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	ctx := context.Background()
	secrets := f.kube.CoreV1().Secrets(testNamespace)
	runs := 0
	got, err := f.store.Update(ctx, u.uid, func(up *Upload) error {
		runs++
		if runs == 1 {
			// Another writer (the controller, another replica) changes the
			// Secret between this read and the patch.
			sec, err := secrets.Get(ctx, api.UploadSecretPrefix+u.uid, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			sec.Annotations = map[string]string{api.AnnotationUploadState: api.UploadState{Received: 42, Total: 100}.Encode()}
			if _, err := secrets.Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		} else if up.State.Received != 42 {
			t.Errorf("second run sees %+v, not the concurrent write", up.State)
		}
		up.State.Speed = 7
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 2 {
		t.Fatalf("f ran %d times, want 2 (once more after the conflict)", runs)
	}
	st, _ := f.state(u)
	if st.Received != 42 || st.Speed != 7 || got.State.Received != 42 || got.State.Speed != 7 {
		t.Fatalf("stored %+v, returned %+v; want the concurrent write kept and ours added", st, got.State)
	}
}

func TestSecretStore_UnchangedUpdateWritesNothing(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	before := f.patches.Load()
	if _, err := f.store.Update(context.Background(), u.uid, func(*Upload) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if f.patches.Load() != before {
		t.Error("an Update that changed nothing patched the Secret")
	}
}

func TestSecretStore_IncompleteSecretsAreNotUploads(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for name, edit := range map[string]func(map[string][]byte, map[string]string){
		"no label":       func(_ map[string][]byte, l map[string]string) { delete(l, api.LabelUpload) },
		"no token":       func(d map[string][]byte, _ map[string]string) { delete(d, api.UploadKeyToken) },
		"no dvcr token":  func(d map[string][]byte, _ map[string]string) { delete(d, api.UploadKeyDVCRToken) },
		"no repository":  func(d map[string][]byte, _ map[string]string) { delete(d, api.UploadKeyRepository) },
		"bad expiration": func(d map[string][]byte, _ map[string]string) { d[api.UploadKeyExpires] = []byte("tomorrow") },
	} {
		t.Run(name, func(t *testing.T) {
			u := f.addUpload(time.Time{})
			secrets := f.kube.CoreV1().Secrets(testNamespace)
			sec, err := secrets.Get(ctx, api.UploadSecretPrefix+u.uid, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			edit(sec.Data, sec.Labels)
			if _, err := secrets.Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			if _, err := f.store.Update(ctx, u.uid, func(*Upload) error { return nil }); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Update of an incomplete Secret = %v, want ErrNotFound", err)
			}
			resp, _ := f.do(http.MethodPut, u.url, strings.NewReader("x"), nil)
			if resp.StatusCode != http.StatusNotFound && name != "no label" {
				// (the cache may still hold the labelled version; the
				// write path above reads the API server)
				t.Errorf("PUT to an incomplete upload: %d", resp.StatusCode)
			}
		})
	}
}

func TestSecretStore_UnreadableStateStartsOver(t *testing.T) {
	f := newFixture(t)
	u := f.addUpload(time.Time{})
	ctx := context.Background()
	secrets := f.kube.CoreV1().Secrets(testNamespace)
	sec, err := secrets.Get(ctx, api.UploadSecretPrefix+u.uid, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sec.Annotations = map[string]string{api.AnnotationUploadState: "{not json", AnnotationHolder: "nor this"}
	if _, err := secrets.Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	up, err := f.store.Update(ctx, u.uid, func(*Upload) error { return nil })
	if err != nil || up.State.Received != 0 || up.State.Total != -1 || up.Holder.ID != "" {
		t.Fatalf("Update = %+v, %v", up, err)
	}
}
